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

import torch  # noqa: E402

from backend.nn.llm import llama  # noqa: E402
from backend.nn.ernie import ErnieImageModel  # noqa: E402
from backend.nn.vae import AutoencoderKLFlux2  # noqa: E402
from backend.text_processing.ministral3_engine import Ministral3TextProcessingEngine  # noqa: E402
from huggingface_guess import detection, model_list  # noqa: E402

sys.path.append(HERE)
import neo_tiny_common as common  # noqa: E402
from neo_tiny_common import check, initialise, neo_layers, strict  # noqa: E402

preload = common.load_module("neo_tiny_ernie_preload", os.path.join(HERE, "neo_tiny_ernie", "preload.py"))
spec = preload.spec()

NAME = "tiny-ernie.safetensors"
PROMPTS = ("a red cube on a table", "two blue birds in the sky")
# DiT value projections x 8: the few text tokens share one attention with the image tokens and every token is
# RMS-normed before it, so a text-side gain does nothing; with plain init another prompt moved the DiT output by 0.002
VALUE_GAIN = 8.0


def tokenizer_dir(tmp):
    return common.unpacked_tokenizer_dir(NEO, os.path.join(spec.neo_repo_dir(NEO), "tokenizer"), "ernie.tokenizer.json.xz", tmp)


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

    common.save_checkpoint(sd, OUT_DIR, NAME)


def _real_dit():
    """ErnieImageModel's constructor defaults (the real Ernie-Image 8B sizes)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(ErnieImageModel.__init__).parameters.items()
            if k in spec.DIT and p.default is not inspect.Parameter.empty}


if __name__ == "__main__":
    main()
