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

import torch  # noqa: E402

from backend.nn.llm import llama  # noqa: E402
from backend.nn.lumina import NextDiT  # noqa: E402
from backend.nn.vae import IntegratedAutoencoderKL  # noqa: E402
from huggingface_guess import detection, model_list  # noqa: E402

sys.path.append(HERE)
import neo_tiny_common as common  # noqa: E402
from neo_tiny_common import check, initialise, neo_layers, strict  # noqa: E402

preload = common.load_module("neo_tiny_lumina_preload", os.path.join(HERE, "neo_tiny_lumina", "preload.py"))
spec = preload.spec()

NAME = "tiny-lumina.safetensors"
PROMPTS = ("a red cube on a table", "two blue birds in the sky")


def tokenizer_dir(tmp):
    return common.unpacked_tokenizer_dir(NEO, os.path.join(spec.neo_repo_dir(NEO), "tokenizer"), "neta.tokenizer.json.xz", tmp)


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

    common.save_checkpoint(sd, OUT_DIR, NAME)


if __name__ == "__main__":
    main()
