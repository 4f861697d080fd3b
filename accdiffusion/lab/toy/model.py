"""The toy text-to-image model: the real ldm ``UNetModel`` in the SD1.x block layout (attention
at downsample 1, 2, 4; cross-attention on a 64-d text context) at tiny widths, conditioned by the
tiny CLIP text encoder of ``../shared/tinymodel/clip-text-tiny``, denoising the fixed 8×8×4
patch latent of :mod:`.scenes` with SD's ε-prediction schedule.

The CLIP token embedding stays at a seeded random initialisation (frozen, rebuilt from the seed
at load, so the 3.2 M-row table is not stored); CLIP's position embedding and its two
transformer layers are trained with the UNet.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..reference import UNET_CONFIGS, Host, RowCond, load_tokenizer

ROOT = Path(__file__).resolve().parents[3]  # the repository
TOKENIZER_DIR = Path(os.environ.get("ACCDIFFUSION_TOKENIZER_DIR",
                                    ROOT.parent / "shared" / "tinymodel" / "clip-text-tiny"))
WEIGHTS = Path(__file__).resolve().parent / "toy-weights.safetensors"
# the SD1 layout of reference.UNET_CONFIGS, narrower at depth (32/64/64/64 channels) to keep
# the committed weights at a few MB
UNET_CONFIG: dict[str, Any] = dict(UNET_CONFIGS["sd1"], channel_mult=[1, 2, 2, 2])
EMBED_SEED = 1234
CONTEXT = 77  # tokens per CLIP chunk


def build_unet() -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(image_size=8, **UNET_CONFIG)


def build_text_encoder() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(str(TOKENIZER_DIR)))
    table = model.text_model.embeddings.token_embedding.weight
    generator = torch.Generator().manual_seed(EMBED_SEED)
    with torch.no_grad():
        table.copy_(torch.randn(table.shape, generator=generator) * 0.02)
    table.requires_grad_(False)
    return model


def encode_ids(text_model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, 77·k] ids → [B, 77·k, 64] context: each 77-token chunk encoded on its own, as SD1."""
    chunks = ids.split(CONTEXT, dim=1)
    return torch.cat([text_model(input_ids=c).last_hidden_state for c in chunks], dim=1)


@dataclass
class ToyHost(Host):
    """The reference host with the trained CLIP text encoder in place of its random embedding."""
    text_model: nn.Module | None = None

    def encode(self, prompts: Sequence[str], vector: float = 0.0) -> list[RowCond]:
        out = []
        with torch.no_grad():
            for prompt in prompts:  # one by one: prompts may span different numbers of chunks
                ids = torch.tensor([self.context_ids(prompt)])
                out.append(RowCond(encode_ids(self.text_model, ids)[0].to(self.device)))
        return out


def trainable_state(unet: nn.Module, text_model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"text.{k}": v for k, v in text_model.state_dict().items()
                  if "token_embedding" not in k and "position_ids" not in k})
    return state


def save_weights(path: Path, unet: nn.Module, text_model: nn.Module, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in trainable_state(unet, text_model).items()}
    tmp = Path(str(path) + ".tmp")
    save_file(state, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_host(path: Path | str = WEIGHTS) -> ToyHost:
    """The trained toy model as a host for :mod:`accdiffusion.lab.reference` (float32, eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"toy weights not found at {path}; run `python -m accdiffusion.lab.toy train`")
    state = load_file(str(path))
    unet, text_model = build_unet(), build_text_encoder()
    unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
    missing, unexpected = text_model.load_state_dict(
        {k[5:]: v.float() for k, v in state.items() if k.startswith("text.")}, strict=False)
    bad = [k for k in missing if "token_embedding" not in k and "position_ids" not in k]
    if bad or unexpected:
        raise RuntimeError(f"toy weights do not fit the model: missing {bad}, unexpected {unexpected}")
    host = ToyHost(unet.eval(), load_tokenizer(str(TOKENIZER_DIR)), text_model=text_model.eval())
    with safe_open(str(path), "pt") as f:
        host.meta = json.loads((f.metadata() or {}).get("meta", "{}"))  # type: ignore[attr-defined]
    return host
