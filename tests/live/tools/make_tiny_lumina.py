"""Write a tiny, randomly initialised Lumina 2 checkpoint for Forge Neo: OUT_DIR/tiny-lumina.safetensors.

usage: NEO_DIR=/path/to/neo <Neo's venv>/bin/python tests/live/tools/make_tiny_lumina.py OUT_DIR

All-in-one, keyed like a ComfyUI/Neo Lumina 2 file and stored in bf16 like the real ones:
  model.diffusion_model.*                    Neo's NextDiT (backend/nn/lumina.py) with the Lumina 2 options
  text_encoders.gemma2_2b.transformer.model.*  Neo's Gemma-2 (backend/nn/llm/llama.py Llama2_, gemma2 blocks),
                                             the real 256 000-token vocabulary
  vae.*                                      Neo's FLUX.1-layout VAE (backend/nn/vae.py, 16 latent channels)
Sizes: neo_tiny_lumina/tiny_lumina_spec.py. Neo loads the file only with the preload in neo_tiny_lumina/ linked
into its extensions (it registers the tiny type and writes the component folder: Neo's Neta-Lumina folder with the
Gemma-2 and VAE configs shrunk, Neo's own tokenizer); this script builds the same folder in a temp dir for its
checks. Neo's layer classes (``using_forge_operations``) skip weight initialisation, so every parameter is set to
NaN first and then initialised from fixed seeds (the file is the same on every run). Checks before saving: Neo's
real Gemma tokenizer and the Lumina prompt template, forward passes of text encoder, DiT and VAE (finite, non-zero,
prompt-dependent), Neo's own detection plus the tiny type's extra config giving back the constructor config, the
tiny type (and no other registered type) matching the file, and every saved key loading strictly into fresh
instances built the way Neo's loader builds them.
"""

import json
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
from backend.nn.lumina import NextDiT  # noqa: E402
from backend.nn.vae import IntegratedAutoencoderKL  # noqa: E402
from huggingface_guess import detection, model_list  # noqa: E402

_p = importlib.util.spec_from_file_location("neo_tiny_lumina_preload", os.path.join(HERE, "neo_tiny_lumina", "preload.py"))
preload = importlib.util.module_from_spec(_p)
_p.loader.exec_module(preload)
spec = preload.spec()

CPU = torch.device("cpu")
NAME = "tiny-lumina.safetensors"
PROMPTS = ("a red cube on a table", "two blue birds in the sky")
TORCH_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
TORCH_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)


def neo_layers():
    """Neo's layer classes as its loader uses them, fp32 on the CPU."""
    return using_forge_operations(device=CPU, dtype=torch.float32, manual_cast_enabled=False)


@torch.no_grad()
def initialise(model, seed):
    """NaN everywhere, then: torch's own Linear/Conv init (Neo's subclasses make reset_parameters a no-op, so the
    torch base method is called), norm gains around 1 (Gemma's ``add`` norms store gain - 1, so around 0), small
    norm biases, token embeddings N(0.5, 1) (the emphasis step rescales by the mean of the prompt embeddings: it must
    not be near 0). Anything still non-finite is an error."""
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
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"parameters left uninitialised: {bad}"
    return model


def check(y, shape, what):
    assert tuple(y.shape) == tuple(shape), (what, tuple(y.shape), shape)
    assert torch.isfinite(y).all() and float(y.abs().mean()) > 1e-3, (what, float(y.abs().mean()))
    print(f"{what}: {tuple(y.shape)}, mean |x| {float(y.abs().mean()):.3f}")


def tokenizer_dir(tmp):
    """Neo's Neta-Lumina tokenizer folder; Neo unpacks its tokenizer.json from neta.tokenizer.json.xz at start,
    so on a Neo that never started unpack it the same way into a temp copy (Neo's folder stays untouched)."""
    src = os.path.join(spec.neo_repo_dir(NEO), "tokenizer")
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        return src
    import lzma

    dst = shutil.copytree(src, os.path.join(tmp, "tokenizer"))
    with lzma.open(os.path.join(NEO, "backend", "huggingface", "neta.tokenizer.json.xz")) as f, \
            open(os.path.join(dst, "tokenizer.json"), "wb") as g:
        g.write(f.read())
    return dst


def build_gemma(repo):
    with open(os.path.join(repo, "text_encoder", "config.json")) as f:
        config = json.load(f)
    with neo_layers():
        return llama.Gemma2_2B(config).eval()      # the preload's wrapped __init__, as Neo's loader calls it


def encode(te, tok, prompt):
    """What Neo's GemmaTextProcessingEngine does: Lumina template, BOS 2, no other special tokens, hidden states
    entering the last layer, no final norm."""
    text = "\n".join(["You are an assistant designed to generate anime images with the highest degree of image-text "
                      "alignment based on danbooru tags. <Prompt Start>", prompt])
    ids = torch.tensor([[2] + tok(text, add_special_tokens=False)["input_ids"]])
    assert int(ids.max()) < spec.GEMMA_VOCAB
    with torch.no_grad():
        _, z = te(None, attention_mask=torch.ones_like(ids), embeds=te.get_input_embeddings()(ids),
                  intermediate_output=-2, final_layer_norm_intermediate=False)
    check(z, (1, ids.shape[1], spec.GEMMA["hidden_size"]), f"Gemma-2 ({ids.shape[1]} tokens)")
    return z


def strict(factory, sd, what):
    with neo_layers():
        m = factory()
    m.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    print(f"{what}: {len(sd)} keys load strictly")


def main():
    preload.patch_gemma()
    tmp = tempfile.mkdtemp(prefix="tiny-lumina-")
    try:
        repo = spec.write_repo(NEO, os.path.join(tmp, spec.NAME), tokenizer_dir=tokenizer_dir(tmp))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.join(repo, "tokenizer"))
        te = initialise(build_gemma(repo), seed=11)
        ctx = [encode(te, tok, p) for p in PROMPTS]

        with neo_layers():
            dit = NextDiT(**spec.DIT).eval()
        initialise(dit, seed=12)
        x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(13))
        with torch.no_grad():
            out = [dit(x, torch.tensor([0.6]), c) for c in ctx]
        for y in out:
            check(y, x.shape, "NextDiT (Lumina 2)")
        moved = float((out[0] - out[1]).abs().mean())
        assert moved > 1e-3, moved
        print(f"NextDiT: another prompt moves the output by {moved:.4f}")

        vae_config = IntegratedAutoencoderKL.load_config(os.path.join(repo, "vae"))
        with neo_layers():
            vae = IntegratedAutoencoderKL.from_config(vae_config).eval()
        initialise(vae, seed=14)
        with torch.no_grad():
            img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(15)) * 2 - 1
            z = vae.encode(img)
            check(z, (1, 16, 8, 8), "VAE encode")
            check(vae.decode(z), img.shape, "VAE decode")

        dit_sd, te_sd, vae_sd = dit.state_dict(), te.state_dict(), vae.state_dict()
        sd = {f"model.diffusion_model.{k}": v for k, v in dit_sd.items()}
        sd.update({f"text_encoders.gemma2_2b.transformer.{k}": v for k, v in te_sd.items()})
        sd.update({f"vae.{k}": v for k, v in vae_sd.items()})

        # Neo's detection + the tiny type's extra config = the constructor config; the tiny type is the first match
        found = detection.detect_unet_config(sd, "model.diffusion_model.")
        assert found.pop("image_model") == "lumina2", found
        found.pop("nunchaku", None)
        assert {**found, **spec.DIT_EXTRA} == spec.DIT, (found, spec.DIT)
        print(f"Neo detection: {found} (+ the tiny type's extra config = the constructor config)")
        preload.register()
        found["image_model"] = "lumina2"
        matching = [m.__name__ for m in model_list.models if m.matches(found, sd)]
        assert matching == ["TinyRandomLumina"], matching
        assert model_list.Lumina2.clip_target(model_list.Lumina2, dict(sd)) == {"gemma2_2b.transformer": "text_encoder"}
        print("model list: only TinyRandomLumina matches; text encoder keys gemma2_2b.transformer.*")

        strict(lambda: NextDiT(**spec.DIT), dit_sd, "DiT")
        strict(lambda: build_gemma(repo), te_sd, "Gemma-2")
        strict(lambda: IntegratedAutoencoderKL.from_config(vae_config), vae_sd, "VAE")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}
    assert all(torch.isfinite(v).all() for v in sd.values())
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, NAME)
    save_file(sd, path)
    print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, {len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values()) / 1e6:.2f} M values")


if __name__ == "__main__":
    main()
