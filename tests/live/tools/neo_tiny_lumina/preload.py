"""Preload-only Forge Neo extension (test tooling): load the tiny random Lumina 2 checkpoint of
``tests/live/tools/make_tiny_lumina.py`` with an unmodified Neo. Link this folder into Neo's extensions folder under
a name that sorts after the tiny-model helper ``forge-tiny-models`` (Neo runs preloads in name order, and the helper
registers nothing once it finds any ``TinyRandom*`` type), e.g. ``extensions/neo-tiny-lumina``.

What it does, for the tiny checkpoint only (every other model goes through Neo's code untouched):
- registers ``TinyRandomLumina`` (a ``model_list.Lumina2``) at the front of ``huggingface_guess.model_list.models``.
  It matches Neo's own detection result ("Lumina 2" branch, ``image_model`` lumina2) with the tiny width 64 and the
  exact tiny shapes (``tiny_lumina_spec.SHAPES``, no Z-Image pad tokens), and adds the options Neo's detection sets
  only for the real width 2304 (heads, rope, FFN multiplier) through ``unet_extra_config``;
- joins ``Lumina2.matched_guesses`` of ``backend/diffusion_engine/lumina.py`` when such a type is built (Neo picks the
  engine with ``type(guess) is x``, so a subclass is not matched by itself);
- points the type at a component folder written by ``tiny_lumina_spec.write_repo`` (Neo's Neta-Lumina folder with
  the Gemma-2 and VAE configs shrunk, Neo's own Gemma tokenizer linked in), in ``$NEO_TINY_LUMINA_REPO`` or the
  temp dir;
- wraps ``backend.nn.llm.llama.Gemma2_2B.__init__``: Neo builds Gemma-2 from its hard-coded 2B dataclass (the
  folder's config.json is only asserted to agree); a config marked ``"forge_tiny_random": true`` gets that dataclass
  with the config's sizes, any other config runs Neo's original ``__init__``.
"""

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.append(os.path.dirname(HERE))  # tests/live/tools: the part the tiny Neo types share
import neo_tiny_common as common  # noqa: E402

TAG = "[neo-tiny-lumina]"


def spec():
    """tiny_lumina_spec.py beside this file (an extension folder is not on sys.path)."""
    return common.load_module("neo_tiny_lumina_spec", os.path.join(HERE, "tiny_lumina_spec.py"))


def repo_dir():
    return os.environ.get("NEO_TINY_LUMINA_REPO") or os.path.join(tempfile.gettempdir(), f"neo-tiny-lumina-{os.getuid()}", spec().NAME)


def tiny_gemma_config(llama, config_dict):
    """Neo's Gemma2_2B_Config with the sizes of a tiny text_encoder/config.json."""
    cfg = llama.Gemma2_2B_Config()
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta"):
        if k in config_dict:
            setattr(cfg, k, config_dict[k])
    cfg.head_dim = config_dict["head_dim"]
    return cfg


def patch_gemma():
    """Let Neo's Gemma2_2B build a tiny Gemma-2 for configs marked tiny; idempotent."""
    from backend.nn.llm import llama

    common.patch_llm_init(llama, "Gemma2_2B", "_neo_tiny_lumina", spec().TINY_MARK, tiny_gemma_config)


def _engine():
    from backend.diffusion_engine.lumina import Lumina2

    return Lumina2


def register():
    s = spec()
    return common.register_tiny_type("TinyRandomLumina", common.model_list().Lumina2,
                                     {"image_model": "lumina2", "dim": s.DIT["dim"]}, dict(s.DIT_EXTRA), s, repo_dir,
                                     _engine, patch_gemma)


def preload(parser):
    common.preload_report(TAG, "TinyRandomLumina", "Lumina2", repo_dir(), register)
