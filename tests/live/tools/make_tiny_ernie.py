"""Write a tiny, randomly initialised Ernie-Image checkpoint for Forge Neo: OUT_DIR/tiny-ernie.safetensors.

usage: NEO_DIR=/path/to/neo <Neo's venv>/bin/python tests/live/tools/make_tiny_ernie.py OUT_DIR

All-in-one, keyed like a ComfyUI/Neo Ernie-Image file and stored in bf16 like the real ones:
  model.diffusion_model.*                        Neo's ErnieImageModel (backend/nn/ernie.py)
  text_encoders.ministral3_3b.transformer.model.*  Neo's Ministral-3 (backend/nn/llm/llama.py Llama2_ with the
                                                 Ministral3_3B config), the real 131 072-token vocabulary
  vae.*                                          Neo's FLUX.2 VAE (backend/nn/vae.py AutoencoderKLFlux2: 32 latent
                                                 channels packed 2 x 2 -> 128, latent batch-norm statistics bn.*)
Sizes: neo_tiny_ernie/tiny_ernie_spec.py. Neo loads the file only with the preload in neo_tiny_ernie/ linked into its
extensions (it registers the tiny type and writes the component folder: Neo's baidu/ERNIE-Image folder with the
Ministral-3 and VAE configs shrunk, Neo's own tokenizer); this script builds the same folder in a temp dir for its
checks. Neo's layer classes (``using_forge_operations``) skip weight initialisation, so every parameter is set to
NaN first and then initialised from fixed seeds (the file is the same on every run). Checks before saving: Neo's
real Ernie tokenizer through Neo's own Ministral3TextProcessingEngine, forward passes of text encoder, DiT and VAE
(finite, non-zero, prompt-dependent), Neo's own detection plus the tiny type's extra config giving back the
constructor config, the tiny type being the first registered type that matches the file (Neo's own ErnieImage
matches any Ernie file, the tiny type only this one), and every saved key loading strictly into fresh instances
built the way Neo's loader builds them.
"""

import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if len(sys.argv) != 2 or "NEO_DIR" not in os.environ:
    sys.exit(__doc__)
OUT_DIR = os.path.abspath(sys.argv[1])
NEO = os.path.abspath(os.environ["NEO_DIR"])
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.argv = sys.argv[:1] + ["--cpu"]                               # Neo's backend.args parses the command line
sys.path[:0] = [NEO, os.path.join(NEO, "modules_forge", "packages")]

import importlib.util  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from backend.operations import using_forge_operations  # noqa: E402
from backend.nn.llm import llama  # noqa: E402
from backend.nn.ernie import ErnieImageModel  # noqa: E402
from backend.nn.vae import AutoencoderKLFlux2  # noqa: E402
from backend.text_processing.ministral3_engine import Ministral3TextProcessingEngine  # noqa: E402
from huggingface_guess import detection, model_list  # noqa: E402

_p = importlib.util.spec_from_file_location("neo_tiny_ernie_preload", os.path.join(HERE, "neo_tiny_ernie", "preload.py"))
preload = importlib.util.module_from_spec(_p)
_p.loader.exec_module(preload)
spec = preload.spec()

CPU = torch.device("cpu")
NAME = "tiny-ernie.safetensors"
PROMPTS = ("a red cube on a table", "two blue birds in the sky")
TORCH_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
TORCH_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)
# DiT value projections x 8: the few text tokens share one attention with the image tokens and every token is
# RMS-normed before it, so a text-side gain does nothing; with plain init another prompt moved the DiT output by 0.002
VALUE_GAIN = 8.0


def neo_layers():
    """Neo's layer classes as its loader uses them, fp32 on the CPU."""
    return using_forge_operations(device=CPU, dtype=torch.float32, manual_cast_enabled=False)


@torch.no_grad()
def initialise(model, seed):
    """NaN everywhere, then: torch's own Linear/Conv init (Neo's subclasses make reset_parameters a no-op, so the
    torch base method is called), norm gains around 1, small norm biases, token embeddings N(0.5, 1), the VAE's
    latent batch-norm statistics a little random (torch's defaults are 0 / 1). Anything still non-finite is an
    error."""
    for p in model.parameters():
        p.fill_(float("nan"))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for m in model.modules():
        for base in TORCH_LAYERS:
            if isinstance(m, base):
                base.reset_parameters(m)
        if isinstance(m, torch.nn.Embedding):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) + 0.5)
        if isinstance(m, TORCH_NORMS):
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
    assert tuple(y.shape) == tuple(shape), (what, tuple(y.shape), shape)
    assert torch.isfinite(y).all() and float(y.abs().mean()) > 1e-3, (what, float(y.abs().mean()))
    print(f"{what}: {tuple(y.shape)}, mean |x| {float(y.abs().mean()):.3f}")


def tokenizer_dir(tmp):
    """Neo's ERNIE-Image tokenizer folder; Neo unpacks its tokenizer.json from ernie.tokenizer.json.xz at start,
    so on a Neo that never started unpack it the same way into a temp copy (Neo's folder stays untouched)."""
    src = os.path.join(spec.neo_repo_dir(NEO), "tokenizer")
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        return src
    import lzma

    dst = shutil.copytree(src, os.path.join(tmp, "tokenizer"))
    with lzma.open(os.path.join(NEO, "backend", "huggingface", "ernie.tokenizer.json.xz")) as f, \
            open(os.path.join(dst, "tokenizer.json"), "wb") as g:
        g.write(f.read())
    return dst


def build_ministral(repo):
    """What Neo's loader does for Mistral3Model: Ministral3_3B(config.json as a dict) (the preload's wrapped
    __init__ builds the tiny one for the marked config)."""
    from backend.utils import read_arbitrary_config

    with neo_layers():
        return llama.Ministral3_3B(read_arbitrary_config(os.path.join(repo, "text_encoder"))).eval()


def load_tokenizer(repo):
    """The tokenizer component as Neo's loader builds it (model_index.json names PixtralProcessor)."""
    from transformers import PixtralProcessor

    return PixtralProcessor.from_pretrained(os.path.join(repo, "tokenizer"))


def strict(factory, sd, what):
    with neo_layers():
        m = factory()
    m.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    print(f"{what}: {len(sd)} keys load strictly")


def main():
    preload.patch_ministral()
    tmp = tempfile.mkdtemp(prefix="tiny-ernie-")
    os.environ["NEO_TINY_ERNIE_REPO"] = os.path.join(tmp, "registered", spec.NAME)   # the guess below writes it
    try:
        repo = spec.write_repo(NEO, os.path.join(tmp, spec.NAME), tokenizer_dir=tokenizer_dir(tmp))
        tok = load_tokenizer(repo)
        te = initialise(build_ministral(repo), seed=21)
        engine = Ministral3TextProcessingEngine(text_encoder=te, tokenizer=tok)

        ids = [int(i) for i in engine.tokenize_line("a red cat")[0].tokens]
        print(f"Neo's tokenize_line('a red cat'): {ids} = {tok.tokenizer.convert_ids_to_tokens(ids)}")
        for prompt in PROMPTS:
            ids = [int(i) for i in engine.tokenize_line(prompt)[0].tokens]
            assert ids[0] == 1 and max(ids) < spec.MINISTRAL_VOCAB, ids     # BOS <s>, no template
        with torch.no_grad():
            ctx = [engine([p])[0] for p in PROMPTS]                       # Neo's own encode: (tokens, width)
        for p, z in zip(PROMPTS, ctx):
            check(z, (len(engine.tokenize_line(p)[0].tokens), spec.MINISTRAL["hidden_size"]), f"Ministral-3 {p!r}")

        with neo_layers():
            dit = ErnieImageModel(**spec.DIT).eval()
        initialise(dit, seed=22)
        with torch.no_grad():
            for layer in dit.layers:
                layer.self_attention.to_v.weight.mul_(VALUE_GAIN)
        x = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(23))
        with torch.no_grad():
            out = [dit(x, torch.tensor([600.0]), c.unsqueeze(0)) for c in ctx]
        for y in out:
            check(y, x.shape, "ErnieImageModel")
        moved = float((out[0] - out[1]).abs().mean())
        assert moved > 1e-2, moved
        print(f"ErnieImageModel: another prompt moves the output by {moved:.4f}")

        vae_config = AutoencoderKLFlux2.load_config(os.path.join(repo, "vae"))
        with neo_layers():
            vae = AutoencoderKLFlux2.from_config(vae_config).eval()
        initialise(vae, seed=24)
        with torch.no_grad():
            img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(25)) * 2 - 1
            z = vae.encode(img)
            check(z, (1, 128, 4, 4), "VAE encode")
            check(vae.decode(z), img.shape, "VAE decode")

        dit_sd, te_sd, vae_sd = dit.state_dict(), te.state_dict(), vae.state_dict()
        sd = {f"model.diffusion_model.{k}": v for k, v in dit_sd.items()}
        sd.update({f"text_encoders.ministral3_3b.transformer.{k}": v for k, v in te_sd.items()})
        sd.update({f"vae.{k}": v for k, v in vae_sd.items()})

        # Neo's detection reads no size; Neo's guess with the tiny type registered gives the constructor config
        found = detection.detect_unet_config(sd, "model.diffusion_model.")
        assert found == {"image_model": "ernie"}, found
        preload.register()
        matching = [m.__name__ for m in model_list.models if m.matches(found, sd)]
        assert matching == ["TinyRandomErnie", "ErnieImage"], matching
        import huggingface_guess

        guess = huggingface_guess.guess(dict(sd))
        assert type(guess).__name__ == "TinyRandomErnie" and guess.unet_config == spec.DIT, guess.unet_config
        from backend.diffusion_engine.ernie import ErnieImage

        assert type(guess) in ErnieImage.matched_guesses
        assert guess.clip_target(dict(sd)) == {"ministral3_3b.transformer": "text_encoder"}
        real = {"model.diffusion_model." + k: torch.empty(v, device="meta")
                for k, v in spec.shapes({**spec.DIT, **_real_dit()}).items()}
        assert not type(guess).matches(found, real), "the tiny type matches a real-sized Ernie-Image"
        print(f"Neo detection: {found}; guess: TinyRandomErnie (first of {matching}), config = spec.DIT, "
              "run by Neo's ErnieImage engine; a real-sized file does not match the tiny type")

        strict(lambda: ErnieImageModel(**spec.DIT), dit_sd, "DiT")
        strict(lambda: build_ministral(repo), te_sd, "Ministral-3")
        strict(lambda: AutoencoderKLFlux2.from_config(vae_config), vae_sd, "VAE")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sd = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, NAME)
    save_file(sd, path)
    print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, {len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values()) / 1e6:.2f} M values")


def _real_dit():
    """ErnieImageModel's constructor defaults (the real Ernie-Image 8B sizes)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(ErnieImageModel.__init__).parameters.items()
            if k in spec.DIT and p.default is not inspect.Parameter.empty}


if __name__ == "__main__":
    main()
