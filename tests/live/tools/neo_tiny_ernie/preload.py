"""Preload-only Forge Neo extension (test tooling): load the tiny random Ernie-Image checkpoint of
``tests/live/tools/make_tiny_ernie.py`` with an unmodified Neo. Link this folder into Neo's extensions folder under
a name that sorts after the tiny-model helper ``forge-tiny-models`` (Neo runs preloads in name order, and the helper
registers nothing once it finds any ``TinyRandom*`` type), e.g. ``extensions/neo-tiny-ernie``.

What it does, for the tiny checkpoint only (every other model goes through Neo's code untouched):
- registers ``TinyRandomErnie`` (a ``model_list.ErnieImage``) at the front of ``huggingface_guess.model_list.models``.
  Neo's detection gives only ``{"image_model": "ernie"}`` (from the key ``layers.0.mlp.linear_fc2.weight``), so the
  type matches that plus the exact tiny shapes (``tiny_ernie_spec.SHAPES``, and no layer beyond the tiny count), and
  supplies the whole ``ErnieImageModel`` constructor config through ``unet_extra_config``;
- joins ``ErnieImage.matched_guesses`` of ``backend/diffusion_engine/ernie.py`` when such a type is built (Neo picks
  the engine with ``type(guess) is x``, so a subclass is not matched by itself);
- points the type at a component folder written by ``tiny_ernie_spec.write_repo`` (Neo's baidu/ERNIE-Image folder
  with the Ministral-3 and VAE configs shrunk, Neo's own Pixtral tokenizer linked in), in ``$NEO_TINY_ERNIE_REPO``
  or the temp dir;
- wraps ``backend.nn.llm.llama.Ministral3_3B.__init__``: Neo builds Ministral-3 from its hard-coded 3B dataclass
  (the folder's config.json is only asserted to agree); a config marked ``"forge_tiny_random": true`` gets that
  dataclass with the sizes of the config's ``text_config``, any other config runs Neo's original ``__init__``.
"""

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.append(os.path.dirname(HERE))  # tests/live/tools: the part the tiny Neo types share
import neo_tiny_common as common  # noqa: E402

TAG = "[neo-tiny-ernie]"


def spec():
    """tiny_ernie_spec.py beside this file (an extension folder is not on sys.path)."""
    return common.load_module("neo_tiny_ernie_spec", os.path.join(HERE, "tiny_ernie_spec.py"))


def repo_dir():
    return os.environ.get("NEO_TINY_ERNIE_REPO") or os.path.join(tempfile.gettempdir(), f"neo-tiny-ernie-{os.getuid()}", spec().NAME)


def tiny_ministral_config(llama, config_dict):
    """Neo's Ministral3_3BConfig with the sizes of a tiny text_encoder/config.json (its text_config)."""
    text = config_dict["text_config"]
    cfg = llama.Ministral3_3BConfig()
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps"):
        if k in text:
            setattr(cfg, k, text[k])
    cfg.head_dim = text["head_dim"]
    return cfg


def patch_ministral():
    """Let Neo's Ministral3_3B build a tiny Ministral-3 for configs marked tiny; idempotent."""
    from backend.nn.llm import llama

    common.patch_llm_init(llama, "Ministral3_3B", "_neo_tiny_ernie", spec().TINY_MARK, tiny_ministral_config)


def _engine():
    from backend.diffusion_engine.ernie import ErnieImage

    return ErnieImage


def register():
    s = spec()
    return common.register_tiny_type("TinyRandomErnie", common.model_list().ErnieImage, {"image_model": "ernie"},
                                     dict(s.DIT), s, repo_dir, _engine, patch_ministral)


def preload(parser):
    common.preload_report(TAG, "TinyRandomErnie", "ErnieImage", repo_dir(), register)
