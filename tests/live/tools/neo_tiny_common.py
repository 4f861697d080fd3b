"""What the tiny Neo checkpoints of this folder share (test tooling; Lumina 2 and Ernie-Image so far): the
component folder a tiny type points Neo at, the preload's registration of a tiny ``huggingface_guess`` type and
its wrap of Neo's hard-coded LLM class, and the generators' initialisation and checks.

Standard library at import time: the preloads load this before Neo has set anything up; torch and Neo's own
modules are imported inside the functions that need them. A preload or spec file finds it with
``sys.path.append(os.path.dirname(HERE))`` (appended: nothing of Neo's is shadowed).
"""

import importlib.util
import json
import os
import sys

PREFIX = "model.diffusion_model."


# --- the component folder (spec files) -------------------------------------------------------------------------
def load_module(name, path):
    """A module from a file (an extension folder is not on sys.path), loaded once per process."""
    mod = sys.modules.get(name)
    if mod is None:
        s = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        sys.modules[name] = mod
    return mod


def write_json(path, data):
    """Write only when the text changes, atomically (two Neo instances may share the folder)."""
    text = json.dumps(data, indent=2) + "\n"
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def link(target, path):
    if os.path.islink(path) and os.readlink(path) == target:
        return
    if os.path.lexists(path):
        os.remove(path)
    os.symlink(target, path)


def write_component_repo(src, dst, text_encoder_class, text_encoder_config, vae, tokenizer_dir=None):
    """Neo's real component folder ``src`` as the tiny type's ``dst``: the text encoder config made by
    ``text_encoder_config(real config)``, the VAE config updated with ``vae``, the scheduler as is, no
    transformer/ folder (Neo builds the DiT from the guessed config) and tokenizer/ a link to Neo's own (or
    ``tokenizer_dir``). Returns dst."""
    for sub in ("", "scheduler", "text_encoder", "vae"):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
    index = read_json(os.path.join(src, "model_index.json"))
    assert index["text_encoder"] == ["transformers", text_encoder_class], index   # "transformer" stays: Neo loads it
    write_json(os.path.join(dst, "model_index.json"), index)
    write_json(os.path.join(dst, "scheduler", "scheduler_config.json"),
               read_json(os.path.join(src, "scheduler", "scheduler_config.json")))
    write_json(os.path.join(dst, "text_encoder", "config.json"),
               text_encoder_config(read_json(os.path.join(src, "text_encoder", "config.json"))))
    write_json(os.path.join(dst, "vae", "config.json"), {**read_json(os.path.join(src, "vae", "config.json")), **vae})
    link(os.path.abspath(tokenizer_dir or os.path.join(src, "tokenizer")), os.path.join(dst, "tokenizer"))
    return dst


# --- the preloads ----------------------------------------------------------------------------------------------
def patch_llm_init(llama, class_name, flag, mark, tiny_config):
    """Let Neo's ``llama.<class_name>`` (built from a hard-coded dataclass) build a tiny model for a config dict
    marked ``mark``: the dataclass ``tiny_config(llama, config_dict)`` gives, in Neo's own ``Llama2_``. Any other
    config runs Neo's original ``__init__``. Idempotent (``flag`` marks the wrapper)."""
    import torch

    cls = getattr(llama, class_name)
    if getattr(cls.__init__, flag, False):
        return
    original = cls.__init__

    def __init__(self, config_dict, *args, **kwargs):
        if not (isinstance(config_dict, dict) and config_dict.get(mark) is True):
            return original(self, config_dict, *args, **kwargs)
        torch.nn.Module.__init__(self)
        cfg = tiny_config(llama, config_dict)
        self.num_layers = cfg.num_hidden_layers
        self.model = llama.Llama2_(cfg)

    __init__.__wrapped__ = original
    setattr(__init__, flag, True)
    cls.__init__ = __init__


def model_list():
    """Neo's ``huggingface_guess.model_list``, also before modules_forge/initialization.py has put Neo's vendored
    packages on sys.path."""
    try:
        from huggingface_guess import model_list as found
    except ImportError:
        from modules.paths_internal import script_path

        p = os.path.join(script_path, "modules_forge", "packages")
        sys.path.insert(0, p)
        try:
            from huggingface_guess import model_list as found
        finally:
            sys.path.remove(p)
    return found


def register_tiny_type(name, base, unet_config, unet_extra_config, spec, repo_dir, engine, prepare):
    """Put a ``huggingface_guess`` type ``name`` (a subclass of ``base``) at the front of Neo's model list, once.
    It matches only the exact DiT shapes ``spec.SHAPES`` (and none of ``spec.ABSENT``), points Neo at the folder
    ``spec.write_repo`` writes in ``repo_dir()``, calls ``prepare()`` when built, and joins the ``matched_guesses``
    of ``engine()`` (Neo picks the engine with ``type(guess) is x``: a subclass is not matched by itself)."""
    models = model_list().models
    found = next((m for m in models if getattr(m, "__name__", "") == name), None)
    if found is not None:
        return found

    def matches(cls, unet_config, state_dict=None):
        if not base.matches.__func__(cls, unet_config, state_dict) or state_dict is None:
            return False
        for k, shape in spec.SHAPES.items():
            v = state_dict.get(PREFIX + k)
            if v is None or tuple(v.shape) != shape:
                return False
        return not any(PREFIX + k in state_dict for k in spec.ABSENT)

    def __init__(self, config):
        base.__init__(self, config)
        from modules.paths_internal import script_path

        self.huggingface_repo = spec.write_repo(script_path, repo_dir())
        prepare()
        target = engine()
        if type(self) not in target.matched_guesses:
            target.matched_guesses = list(target.matched_guesses) + [type(self)]

    tiny = type(name, (base,), {"huggingface_repo": repo_dir(), "unet_config": unet_config,
                               "unet_extra_config": unet_extra_config, "matches": classmethod(matches),
                               "__init__": __init__})
    models.insert(0, tiny)  # in place: detection reads model_list.models at call time
    return tiny


def preload_report(tag, name, engine_name, repo, register):
    """Call ``register`` and say so; warn when no other tiny type was registered before it."""
    others = [m.__name__ for m in model_list().models if getattr(m, "__name__", "").startswith("TinyRandom")]
    register()
    print(f"{tag} registered {name} (Neo engine {engine_name}; component folder {repo})")
    if not others:
        print(f"{tag} note: no TinyRandom* types were registered before this preload; if forge-tiny-models is "
              "installed, link this extension under a name that sorts after it")


# --- the generators --------------------------------------------------------------------------------------------
def neo_layers():
    """Neo's layer classes as its loader uses them, fp32 on the CPU."""
    import torch
    from backend.operations import using_forge_operations

    return using_forge_operations(device=torch.device("cpu"), dtype=torch.float32, manual_cast_enabled=False)


def initialise(model, seed):
    """NaN everywhere, then: torch's own Linear/Conv init (Neo's subclasses make reset_parameters a no-op, so the
    torch base method is called), norm gains around 1 (Gemma's ``add`` norms store gain - 1, so around 0), small
    norm biases, token embeddings N(0.5, 1) (an emphasis step rescales by the mean of the prompt embeddings: it must
    not be near 0), batch-norm statistics a little random (torch's defaults are 0 / 1). Anything still non-finite
    is an error."""
    import torch

    layers = (torch.nn.Linear, torch.nn.Conv2d)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        for m in model.modules():
            for base in layers:
                if isinstance(m, base):
                    base.reset_parameters(m)
            if isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) + 0.5)
            if isinstance(m, norms):
                if getattr(m, "weight", None) is not None:
                    gain = 0.0 if getattr(m, "add", False) else 1.0
                    m.weight.copy_(gain + 0.1 * torch.randn(m.weight.shape, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=gen))
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"parameters left uninitialised: {bad}"
    return model


def check(y, shape, what):
    import torch

    assert tuple(y.shape) == tuple(shape), (what, tuple(y.shape), shape)
    assert torch.isfinite(y).all() and float(y.abs().mean()) > 1e-3, (what, float(y.abs().mean()))
    print(f"{what}: {tuple(y.shape)}, mean |x| {float(y.abs().mean()):.3f}")


def strict(factory, sd, what):
    """Every saved key loads strictly into a fresh instance built with Neo's layers (Neo's loader is non-strict)."""
    with neo_layers():
        m = factory()
    m.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    print(f"{what}: {len(sd)} keys load strictly")


def unpacked_tokenizer_dir(neo, src, packed, tmp):
    """Neo's tokenizer folder ``src``; Neo unpacks its tokenizer.json from backend/huggingface/``packed`` at start,
    so on a Neo that never started unpack it the same way into a temp copy (Neo's folder stays untouched)."""
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        return src
    import lzma
    import shutil

    dst = shutil.copytree(src, os.path.join(tmp, "tokenizer"))
    with lzma.open(os.path.join(neo, "backend", "huggingface", packed)) as f, \
            open(os.path.join(dst, "tokenizer.json"), "wb") as g:
        g.write(f.read())
    return dst


def save_checkpoint(sd, out_dir, name):
    """bf16 like the real files (integer buffers as they are), every value finite."""
    import torch
    from safetensors.torch import save_file

    sd = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).contiguous()
          for k, v in sd.items()}
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    save_file(sd, path)
    print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, {len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values()) / 1e6:.2f} M values")
