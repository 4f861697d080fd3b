"""Joint-attention maps on Forge's REAL Flux, Chroma and MMDiT-X classes (not our stand-ins).

Run with Forge's own python (torch, einops and Forge's backend importable), from the checkout root:

    FORGE_DIR=<Forge 2 checkout> TINY_DIR=<dir with tiny-flux/-chroma/-sd35.safetensors> \\
        <Forge venv>/bin/python tests/live/forge_real_dit.py

tests/live/test_live_forge_models.py runs it and reads the JSON line it prints. For each family it
builds Forge's transformer class (backend/nn/flux.py IntegratedFluxTransformer2DModel,
backend/nn/chroma.py IntegratedChromaTransformer2DModel, backend/nn/mmditx.py MMDiTX) with the
tiny checkpoint's sizes and weights, then checks what :class:`JointAttentionCapture` records
against the attention the model itself computes: a spy on the attention function Forge's blocks
call (flux.py:15-18 ``attention`` -> ``attention_function`` with RoPE applied; mmditx.py:17-26
``attention``, called from block_mixing :636-667 with [context; x]) takes the image-query -> text-key
softmax of every joint call (over all keys, the text columns: the text share) averaged over heads. The
recorded map of a row must equal the mean of those over the recorded blocks (the model's last quarter), the model output must not
change (bit-identical) and no hook may stay behind. Latents of odd size are included: Flux and
Chroma pad them to the patch grid (flux.py:405-407), and the recorder's grid must follow.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORGE = os.environ["FORGE_DIR"]
TINY = Path(os.environ.get("TINY_DIR", ROOT.parent / "shared" / "tinymodel"))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.argv = sys.argv[:1] + ["--always-cpu"]  # backend.args parses sys.argv
sys.path[:0] = [str(ROOT), FORGE, os.path.join(FORGE, "packages_3rdparty")]

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from accdiffusion.method.attention import AttentionRecorder  # noqa: E402
from accdiffusion.method.jointattention import JointAttentionCapture, all_blocks, recorded_blocks  # noqa: E402

# the tiny checkpoints' sizes (shared/tinymodel/forge/tools/make_tiny_{flux,chroma,sd35}.py)
FLUX = dict(in_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2,
            depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True)
CHROMA = dict(in_channels=16, vec_in_dim=768, context_in_dim=64, hidden_size=64, mlp_ratio=4.0, num_heads=2,
              depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True,
              guidance_out_dim=64, guidance_hidden_dim=128, guidance_n_layers=2)
MMDIT = dict(input_size=None, patch_size=2, in_channels=16, depth=2, adm_in_channels=96,
             context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
             out_channels=16, pos_embed_scaling_factor=None, pos_embed_max_size=64, num_patches=64 * 64,
             qk_norm="rms", x_block_self_attn_layers=[0])


def load(model: torch.nn.Module, name: str) -> torch.nn.Module:
    prefix = "model.diffusion_model."
    state = {k[len(prefix):]: v.float() for k, v in load_file(str(TINY / f"{name}.safetensors")).items()
             if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (name, missing[:5], unexpected[:5])
    return model.float().eval()


def spy_flux(module, text_len: int, image_len: int, seen: list) -> None:
    original = module.attention_function

    def spy(q, k, v, heads, skip_reshape=False, **kw):
        # q, k: [B, H, text + image, D] with RoPE applied (flux.py:15-18)
        logits = q[:, :, text_len:].float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        seen.append(torch.softmax(logits, -1)[..., :text_len].mean(1))  # [B, image, text]: the text share
        return original(q, k, v, heads, skip_reshape=skip_reshape, **kw)

    module.attention_function = spy


def spy_mmdit(module, text_len: int, image_len: int, seen: list) -> None:
    original = module.attention

    def spy(q, k, v, heads, mask=None):
        if q.shape[1] == text_len + image_len:  # a joint call ([context; x]); the x-block's attn2 is image-only
            b, length, dim = q.shape
            qh = q.view(b, length, heads, dim // heads).transpose(1, 2).float()
            kh = k.view(b, -1, heads, dim // heads).transpose(1, 2).float()
            logits = qh[:, :, text_len:] @ kh.transpose(-1, -2) * (dim // heads) ** -0.5
            seen.append(torch.softmax(logits, -1)[..., :text_len].mean(1))
        return original(q, k, v, heads, mask)

    module.attention = spy


def check(family: str, latent: tuple[int, int]) -> dict:
    from backend.nn import flux as flux_module
    from backend.nn import mmditx as mmdit_module

    torch.manual_seed(0)
    text_len = 7
    x = torch.randn(2, 16, *latent)
    if family == "flux":
        from backend.nn.flux import IntegratedFluxTransformer2DModel

        model = load(IntegratedFluxTransformer2DModel(**FLUX), "tiny-flux")
        args = dict(timestep=torch.tensor([0.6, 0.6]), context=torch.randn(2, text_len, 64), y=torch.randn(2, 32),
                    guidance=torch.tensor([3.5, 3.5]))
        module, spy = flux_module, spy_flux
    elif family == "chroma":
        from backend.nn.chroma import IntegratedChromaTransformer2DModel

        model = load(IntegratedChromaTransformer2DModel(**CHROMA), "tiny-chroma")
        args = dict(timestep=torch.tensor([0.6, 0.6]), context=torch.randn(2, text_len, 64))
        module, spy = flux_module, spy_flux
    else:
        model = load(mmdit_module.MMDiTX(**MMDIT), "tiny-sd35")
        args = dict(t=torch.tensor([600.0, 600.0]), context=torch.randn(2, text_len, 4096), y=torch.randn(2, 96))
        module, spy = mmdit_module, spy_mmdit
    blocks = recorded_blocks(model)
    with torch.no_grad():
        plain = model(x, **args)
        recorder = AttentionRecorder(latent, 2, downsample=2)
        seen: list = []
        saved = dict(module.__dict__)
        spy(module, text_len, recorder.grid[0] * recorder.grid[1], seen)
        try:
            with JointAttentionCapture(model, recorder, [1, None]):  # row 0 is image 1's, row 1 not recorded
                recorded = model(x, **args)
        finally:
            for name in ("attention_function", "attention"):
                if name in saved:
                    setattr(module, name, saved[name])
    grid = recorder.grid
    expected = torch.stack(seen[-len(blocks):]).mean(0)[0].T.reshape(text_len, *grid)  # the model's last blocks
    got = recorder.maps(1)
    return {
        "family": family, "latent": list(latent), "grid": list(grid),
        "identical_output": bool(torch.equal(plain, recorded)),
        "image_tokens_seen": int(seen[0].shape[1]),
        "map_matches": got is not None and bool(torch.allclose(got, expected, atol=1e-5)),
        "max_error": None if got is None else float((got - expected).abs().max()),
        "other_row_empty": recorder.maps(0) is None,
        "recorded_blocks": len(blocks), "blocks": len(all_blocks(model)),
        "last_block_recorded": blocks[-1] is all_blocks(model)[-1],
        "hooks_left": sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in all_blocks(model)),
    }


if __name__ == "__main__":
    results = [check(family, latent) for family in ("flux", "chroma", "sd35")
               for latent in ((8, 12), (9, 7)) if not (family == "sd35" and latent[0] % 2)]
    print("RESULTS " + json.dumps(results))
