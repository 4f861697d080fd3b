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

import importlib.util
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.realpath(__file__))
TAG = "[neo-tiny-ernie]"


def spec():
    """tiny_ernie_spec.py beside this file (an extension folder is not on sys.path)."""
    mod = sys.modules.get("neo_tiny_ernie_spec")
    if mod is None:
        s = importlib.util.spec_from_file_location("neo_tiny_ernie_spec", os.path.join(HERE, "tiny_ernie_spec.py"))
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        sys.modules["neo_tiny_ernie_spec"] = mod
    return mod


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
    import torch
    from backend.nn.llm import llama

    if getattr(llama.Ministral3_3B.__init__, "_neo_tiny_ernie", False):
        return
    original = llama.Ministral3_3B.__init__
    mark = spec().TINY_MARK

    def __init__(self, config_dict, *args, **kwargs):
        if not (isinstance(config_dict, dict) and config_dict.get(mark) is True):
            return original(self, config_dict, *args, **kwargs)
        torch.nn.Module.__init__(self)
        cfg = tiny_ministral_config(llama, config_dict)
        self.num_layers = cfg.num_hidden_layers
        self.model = llama.Llama2_(cfg)

    __init__.__wrapped__ = original
    __init__._neo_tiny_ernie = True
    llama.Ministral3_3B.__init__ = __init__


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
    if any(getattr(m, "__name__", "") == "TinyRandomErnie" for m in model_list.models):
        return
    s = spec()

    class TinyRandomErnie(model_list.ErnieImage):
        huggingface_repo = repo_dir()
        unet_config = {"image_model": "ernie"}
        unet_extra_config = dict(s.DIT)

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
            from backend.diffusion_engine.ernie import ErnieImage

            self.huggingface_repo = s.write_repo(script_path, repo_dir())
            patch_ministral()
            if type(self) not in ErnieImage.matched_guesses:
                ErnieImage.matched_guesses = list(ErnieImage.matched_guesses) + [type(self)]

    model_list.models.insert(0, TinyRandomErnie)  # in place: detection reads model_list.models at call time
    return TinyRandomErnie


def preload(parser):
    others = [m.__name__ for m in _model_list().models if getattr(m, "__name__", "").startswith("TinyRandom")]
    register()
    print(f"{TAG} registered TinyRandomErnie (Neo engine ErnieImage; component folder {repo_dir()})")
    if not others:
        print(f"{TAG} note: no TinyRandom* types were registered before this preload; if forge-tiny-models is "
              "installed, link this extension under a name that sorts after it")
