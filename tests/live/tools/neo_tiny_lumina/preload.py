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

import importlib.util
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.realpath(__file__))
TAG = "[neo-tiny-lumina]"


def spec():
    """tiny_lumina_spec.py beside this file (an extension folder is not on sys.path)."""
    mod = sys.modules.get("neo_tiny_lumina_spec")
    if mod is None:
        s = importlib.util.spec_from_file_location("neo_tiny_lumina_spec", os.path.join(HERE, "tiny_lumina_spec.py"))
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        sys.modules["neo_tiny_lumina_spec"] = mod
    return mod


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
    import torch
    from backend.nn.llm import llama

    if getattr(llama.Gemma2_2B.__init__, "_neo_tiny_lumina", False):
        return
    original = llama.Gemma2_2B.__init__
    mark = spec().TINY_MARK

    def __init__(self, config_dict, *args, **kwargs):
        if not (isinstance(config_dict, dict) and config_dict.get(mark) is True):
            return original(self, config_dict, *args, **kwargs)
        torch.nn.Module.__init__(self)
        cfg = tiny_gemma_config(llama, config_dict)
        self.num_layers = cfg.num_hidden_layers
        self.model = llama.Llama2_(cfg)

    __init__.__wrapped__ = original
    __init__._neo_tiny_lumina = True
    llama.Gemma2_2B.__init__ = __init__


def _model_list():
    try:
        from huggingface_guess import model_list
    except ImportError:  # before modules_forge/initialization.py put Neo's vendored packages on sys.path
        from modules.paths_internal import script_path

        p = os.path.join(script_path, "modules_forge", "packages")
        sys.path.insert(0, p)
        try:
            from huggingface_guess import model_list
        finally:
            sys.path.remove(p)
    return model_list


def register():
    model_list = _model_list()
    if any(getattr(m, "__name__", "") == "TinyRandomLumina" for m in model_list.models):
        return
    s = spec()

    class TinyRandomLumina(model_list.Lumina2):
        huggingface_repo = repo_dir()
        unet_config = {"image_model": "lumina2", "dim": s.DIT["dim"]}
        unet_extra_config = dict(s.DIT_EXTRA)

        @classmethod
        def matches(cls, unet_config, state_dict=None):
            if not super().matches(unet_config, state_dict) or state_dict is None:
                return False
            pre = "model.diffusion_model."
            for k, shape in s.SHAPES.items():
                v = state_dict.get(pre + k)
                if v is None or tuple(v.shape) != shape:
                    return False
            return not any(pre + k in state_dict for k in s.ABSENT)

        def __init__(self, unet_config):
            super().__init__(unet_config)
            from modules.paths_internal import script_path
            from backend.diffusion_engine.lumina import Lumina2

            self.huggingface_repo = s.write_repo(script_path, repo_dir())
            patch_gemma()
            if type(self) not in Lumina2.matched_guesses:
                Lumina2.matched_guesses = list(Lumina2.matched_guesses) + [type(self)]

    model_list.models.insert(0, TinyRandomLumina)  # in place: detection reads model_list.models at call time
    return TinyRandomLumina


def preload(parser):
    others = [m.__name__ for m in _model_list().models if getattr(m, "__name__", "").startswith("TinyRandom")]
    register()
    print(f"{TAG} registered TinyRandomLumina (Neo engine Lumina2; component folder {repo_dir()})")
    if not others:
        print(f"{TAG} note: no TinyRandom* types were registered before this preload; if forge-tiny-models is "
              "installed, link this extension under a name that sorts after it")
