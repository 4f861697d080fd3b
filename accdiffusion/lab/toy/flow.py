"""The flow toy: a small joint-attention transformer (MMDiT / Flux-like) trained by rectified flow
on the synthetic scenes of :mod:`.scenes`, its host for :mod:`accdiffusion.lab.reference`, and its
image-query → text-key attention recorder.

Model (own code, after the published design of Flux / SD3): a 16×16×4 latent (the scene code of
:mod:`.scenes` on 4-px patches) cut into 2×2 patches → 8×8 image tokens; the tiny CLIP text
encoder of the UNet toy gives a 24-token sequence (BOS, words, EOS, EOS padding) and its pooled
vector. ``double`` blocks keep separate weights for text and image tokens and attend jointly over
[text; image]; ``single`` blocks run one set of weights over the joined sequence (attention and
MLP in parallel). adaLN modulation from timestep + pooled text, RMS-normed queries and keys, 2-D
rotary position ids on the image tokens (the text gets position 0, as Flux gives its T5 tokens),
computed from each input's own size, so a window or a sub-latent is an image of its own.

Noise: x_σ = (1 − σ)·x₀ + σ·ε, the model predicts the velocity v = ε − x₀, so the denoised
estimate is D(x, σ) = x − σ·v(x, σ) and Euler on (x − D)/σ is Euler on the flow ODE.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...method.hires import StageDenoiser
from ..reference import Host, RowCond, load_tokenizer
from .model import TOKENIZER_DIR, build_text_encoder

FLOW_WEIGHTS = Path(__file__).resolve().parent / "toy-flow-weights.safetensors"
SCENE_PATCH = 4  # scene px per latent px: 64 px → a 16×16 latent
FLOW_LATENT = 16
PATCH = 2  # latent px per image token (Flux's 2×2 patchify)
GRID = FLOW_LATENT // PATCH  # 8×8 image tokens: the word-map grid, as the UNet toy's
TEXT_TOKENS = 24  # one fixed-length text sequence, as Flux's T5 (256/512) at the toy's scale
TIME_SCALE = 1000.0  # σ ∈ [0, 1] → the 0..1000 frame of the timestep embedding and the cosine factors
RECORD_MODES = ("text", "joint", "joint_mean")


@dataclass(frozen=True)
class FlowConfig:
    dim: int = 96
    heads: int = 4
    double_blocks: int = 3
    single_blocks: int = 2
    mlp_ratio: int = 3
    channels: int = 4
    text_dim: int = 64  # the tiny CLIP's width

    @property
    def blocks(self) -> int:
        return self.double_blocks + self.single_blocks


# --- pieces ------------------------------------------------------------------------------------
def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = (sigma.float() * TIME_SCALE)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


def image_positions(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """[h·w, 2] (row, column) ids of an h×w token grid, starting at 0 whatever the grid is cut from."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], -1).float()


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 100.0) -> torch.Tensor:
    """[N, axes] positions → [N, head_dim/2] rotation angles: the head dimension split evenly over
    the axes, each axis rotated at its own geometric set of frequencies."""
    axes = positions.shape[-1]
    per_axis = head_dim // (2 * axes)
    freqs = theta ** (-torch.arange(per_axis, dtype=torch.float32, device=positions.device) / per_axis)
    return torch.cat([positions[:, a:a + 1] * freqs[None] for a in range(axes)], -1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, H, N, D] by ``angles`` [N, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos(), angles.sin()
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x) * self.scale


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Modulation(nn.Module):
    """``count`` per-channel vectors from the conditioning vector; zero at initialisation, so every
    block starts as the identity (adaLN-Zero)."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.count = count
        self.linear = nn.Linear(dim, count * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(F.silu(vec)).chunk(self.count, -1))


class QKV(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.linear = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.linear(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 × [B, H, N, Dh]
        return self.q_norm(q), self.k_norm(k), v


def mlp(dim: int, ratio: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(ratio * dim, dim))


class JointAttention:
    """Attention over [text; image] with rotary ids, and the one place a recorder reads queries and
    keys (it only reads: the output is the same with or without one)."""

    @staticmethod
    def __call__(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor, text_len: int,
                 block: int, recorder: "FlowAttentionRecorder | None") -> torch.Tensor:
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        if recorder is not None and recorder.active:
            recorder.observe(block, q, k, text_len)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(2)  # [B, N, H·Dh]


joint_attention = JointAttention()


class DoubleBlock(nn.Module):
    """Text and image keep their own weights; attention runs jointly over both."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        d = config.dim
        self.img_mod, self.txt_mod = Modulation(d, 6), Modulation(d, 6)
        self.img_qkv, self.txt_qkv = QKV(d, config.heads), QKV(d, config.heads)
        self.img_proj, self.txt_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.img_mlp, self.txt_mlp = mlp(d, config.mlp_ratio), mlp(d, config.mlp_ratio)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor,
                block: int, recorder: "FlowAttentionRecorder | None") -> tuple[torch.Tensor, torch.Tensor]:
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_qkv(modulate(F.layer_norm(img, img.shape[-1:]), i_shift, i_scale))
        tq, tk, tv = self.txt_qkv(modulate(F.layer_norm(txt, txt.shape[-1:]), t_shift, t_scale))
        text_len = txt.shape[1]
        out = joint_attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2),
                              angles, text_len, block, recorder)
        txt = txt + t_gate[:, None] * self.txt_proj(out[:, :text_len])
        img = img + i_gate[:, None] * self.img_proj(out[:, text_len:])
        img = img + i_gate2[:, None] * self.img_mlp(modulate(F.layer_norm(img, img.shape[-1:]), i_shift2, i_scale2))
        txt = txt + t_gate2[:, None] * self.txt_mlp(modulate(F.layer_norm(txt, txt.shape[-1:]), t_shift2, t_scale2))
        return img, txt


class SingleBlock(nn.Module):
    """One set of weights over the joined sequence; attention and MLP side by side."""

    def __init__(self, config: FlowConfig):
        super().__init__()
        d = config.dim
        self.mod = Modulation(d, 3)
        self.qkv = QKV(d, config.heads)
        self.mlp_in = nn.Linear(d, config.mlp_ratio * d)
        self.out = nn.Linear(d + config.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor, text_len: int, block: int,
                recorder: "FlowAttentionRecorder | None") -> torch.Tensor:
        shift, scale, gate = self.mod(vec)
        h = modulate(F.layer_norm(x, x.shape[-1:]), shift, scale)
        attn = joint_attention(*self.qkv(h), angles, text_len, block, recorder)
        return x + gate[:, None] * self.out(torch.cat([attn, F.gelu(self.mlp_in(h), approximate="tanh")], -1))


class FlowTransformer(nn.Module):
    """v(x, σ, text sequence, pooled text) for latents of any even size."""

    def __init__(self, config: FlowConfig = FlowConfig()):
        super().__init__()
        self.config = config
        d, p = config.dim, PATCH
        self.img_in = nn.Linear(config.channels * p * p, d)
        self.txt_in = nn.Linear(config.text_dim, d)
        self.time_in = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.pooled_in = nn.Sequential(nn.Linear(config.text_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.double_stream = nn.ModuleList(DoubleBlock(config) for _ in range(config.double_blocks))
        self.single_stream = nn.ModuleList(SingleBlock(config) for _ in range(config.single_blocks))
        self.final_mod = Modulation(d, 2)
        self.final = nn.Linear(d, config.channels * p * p)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)
        self.recorder: FlowAttentionRecorder | None = None  # set by FlowAttentionRecorder.attach

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h % PATCH or w % PATCH:
            raise ValueError(f"flow toy: latent {h}×{w} is not a multiple of the patch size {PATCH}")
        gh, gw = h // PATCH, w // PATCH
        tokens = x.reshape(b, c, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * PATCH * PATCH)
        img, txt = self.img_in(tokens), self.txt_in(context)
        vec = self.time_in(timestep_embedding(sigma.reshape(-1).expand(b), self.config.dim).to(x)) + self.pooled_in(pooled)
        text_len = txt.shape[1]
        positions = torch.cat([torch.zeros(text_len, 2, device=x.device), image_positions(gh, gw, x.device)])
        angles = rope_angles(positions, self.config.dim // self.config.heads)
        for i, block in enumerate(self.double_stream):
            img, txt = block(img, txt, vec, angles, i, self.recorder)
        joined = torch.cat([txt, img], 1)
        for i, block in enumerate(self.single_stream):
            joined = block(joined, vec, angles, text_len, self.config.double_blocks + i, self.recorder)
        img = joined[:, text_len:]
        shift, scale = self.final_mod(vec)
        out = self.final(modulate(F.layer_norm(img, img.shape[-1:]), shift, scale))
        return out.reshape(b, gh, gw, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# --- the recorder --------------------------------------------------------------------------------
@dataclass
class FlowAttentionRecorder:
    """Image-query → text-key attention of the recorded rows, per block and per normalisation,
    summed over steps: [images, blocks, modes, text tokens, grid cells]. Modes:
      text       softmax over the text keys alone, per head, then the mean over heads; the same as
                 the joint softmax renormalised over the text keys per head and query
      joint      the joint softmax's text columns as they are (each query's text share kept),
                 mean over heads
      joint_mean the joint softmax's text columns averaged over heads, then renormalised over the
                 text keys per query
    :meth:`maps` returns the chosen mode averaged over the chosen blocks."""
    grid: tuple[int, int]
    num_images: int
    blocks: int
    text_tokens: int = TEXT_TOKENS
    mode: str = "text"
    use_blocks: tuple[int, ...] | None = None  # None: every block
    row_images: list[int | None] = field(default_factory=list)
    active: bool = True
    _sums: torch.Tensor | None = None
    _counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        cells = self.grid[0] * self.grid[1]
        self._sums = torch.zeros(self.num_images, self.blocks, len(RECORD_MODES), self.text_tokens, cells)
        self._counts = torch.zeros(self.num_images, self.blocks)

    def attach(self, model: FlowTransformer) -> "FlowAttentionRecorder":
        model.recorder = self
        return self

    @staticmethod
    def detach(model: FlowTransformer) -> None:
        model.recorder = None

    @torch.no_grad()
    def observe(self, block: int, q: torch.Tensor, k: torch.Tensor, text_len: int,
                key_mask: torch.Tensor | None = None) -> None:
        """``key_mask`` [B, text + cells], True on real keys: a batch of captions of different
        lengths padded to the longest (the flow-llm toy); the pad keys take no probability."""
        rows = [(r, img) for r, img in enumerate(self.row_images) if img is not None]
        if not rows or q.shape[2] - text_len != self.grid[0] * self.grid[1]:
            return  # a window or sub-latent of another size: not the first pass's grid
        index = torch.tensor([r for r, _ in rows], device=q.device)
        q_img = q[index, :, text_len:].float()  # [R, H, cells, Dh]
        keys = k[index].float()
        scores = q_img @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [R, H, cells, text + cells]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[index][:, None, None, :], float("-inf"))
        text_scores = scores[..., :text_len]
        text_only = text_scores.softmax(-1).mean(1)
        joint = (text_scores - scores.logsumexp(-1, keepdim=True)).exp().mean(1)
        joint_mean = joint / joint.sum(-1, keepdim=True)
        stacked = torch.stack([text_only, joint, joint_mean], 1).transpose(-1, -2).cpu()  # [R, modes, text, cells]
        for n, (_, image) in enumerate(rows):
            self._sums[image, block, :, :text_len] += stacked[n, :, :self.text_tokens]
            self._counts[image, block] += 1

    def block_maps(self, image: int, block: int, mode: str | None = None) -> torch.Tensor:
        """[text tokens, gh, gw] mean map of one block in one mode."""
        m = RECORD_MODES.index(mode or self.mode)
        count = self._counts[image, block].clamp_min(1)
        return (self._sums[image, block, m] / count).view(self.text_tokens, *self.grid)

    def maps(self, image: int, mode: str | None = None, blocks: Sequence[int] | None = None) -> torch.Tensor | None:
        blocks = list(blocks if blocks is not None else (self.use_blocks or range(self.blocks)))
        if not bool((self._counts[image, blocks] > 0).all()):
            return None
        return torch.stack([self.block_maps(image, b, mode) for b in blocks]).mean(0)

    def nbytes(self) -> int:
        return self._sums.numel() * self._sums.element_size()


# --- flow-matching pieces for the reference host's hires pass --------------------------------
def flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε: the rectified-flow interpolation (Forge's CONST noise scaling)."""
    sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
    return x0 * (1 - sigma) + noise * sigma


def shifted_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps`` + 1 noise levels from 1 to 0, linear in t and time-shifted σ = s·t / (1 + (s − 1)·t)
    (s = 1: plain linear)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class FlowStageDenoiser(StageDenoiser):
    """The engine's stage denoiser with the flow model's noise scaling in the skip residual:
    x ← (1 − c1)·x + c1·((1 − σ)·reference + σ·noise). The dilated branch needs no change: with
    D = x − σ·v its re-expression D(x_blur) + c_skip·(x − x_blur) is exact at c_skip = 1 (it equals
    x − σ·v(x_blur)), which is the engine's default."""

    @torch.no_grad()
    def skip_residual_(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if not self.settings.skip_residual or self.reference is None or self.noise is None:
            return x
        sigma_value = float(torch.as_tensor(sigma).reshape(-1)[0])
        c1 = self.factors(sigma_value).c1
        x.mul_(1.0 - c1).add_(flow_noised(self.reference.to(x), self.noise.to(x), sigma_value), alpha=c1)
        return x


# --- the host ----------------------------------------------------------------------------------------
@dataclass
class FlowHost(Host):
    """The reference host for the flow toy: Euler on D = x − σ·v, flow noise scaling everywhere
    the hires pass noises a clean latent, windows and sub-latents of even size."""
    text_model: nn.Module | None = None
    shift: float = 1.0
    builtin_sampler: bool = True
    channel_stats: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # no k-diffusion wrapper: σ is the flow's own noise level
        self._embedding = None

    @property
    def model(self) -> FlowTransformer:
        return self.unet  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "FlowHost":
        self.unet.to(device)
        self.text_model.to(device)
        return self

    @property
    def transformer_depth(self) -> int:
        return self.model.config.blocks

    @property
    def text_tokens(self) -> int:
        """The recorder's text axis: every context this host builds fits in it."""
        return TEXT_TOKENS

    @property
    def context_dim(self) -> int:
        return self.model.config.text_dim

    def context_ids(self, prompt: str) -> list[int]:
        """BOS, the prompt's tokens (syntax stripped, BREAK ignored), EOS, EOS padding: one sequence
        of TEXT_TOKENS (longer prompts are cut)."""
        text = re.sub(r":\s*[\d.]+\s*(?=[)\]])", " ", prompt.replace("BREAK", " "))
        tokens = self.tokenize(re.sub(r"[()\[\]]", " ", text))[:TEXT_TOKENS - 2]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        return [bos] + tokens + [eos] * (TEXT_TOKENS - 1 - len(tokens))

    def encode(self, prompts: Sequence[str], vector: float = 0.0) -> list[RowCond]:
        with torch.no_grad():
            ids = torch.tensor([self.context_ids(p) for p in prompts])
            out = self.text_model(input_ids=ids)
        return [RowCond(h.to(self.device), p.to(self.device)) for h, p in zip(out.last_hidden_state, out.pooler_output)]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[RowCond]) -> torch.Tensor:
        context = torch.stack([c.context for c in conds]).to(x)
        pooled = torch.stack([c.vector for c in conds]).to(x)
        return self.model(x, sigma.reshape(-1).expand(x.shape[0]).to(x), context, pooled)

    def row_model(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[RowCond]) -> torch.Tensor:
        per_row = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        return x - per_row * self.velocity(x, sigma, conds)

    def skip_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)  # D = x − σ·v: c_skip = 1

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * TIME_SCALE

    def img2img_sigmas(self, steps: int, denoise: float) -> torch.Tensor:
        total = max(steps, int(steps / denoise))
        return shifted_sigmas(total, self.shift)[-(steps + 1):]

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        return flow_noised(x0, noise, sigma)

    def stage_denoiser(self, *args: Any, **kwargs: Any) -> StageDenoiser:
        kwargs.setdefault("size_multiple", PATCH)
        return FlowStageDenoiser(*args, **kwargs)


# --- weights -----------------------------------------------------------------------------------------
def flow_state(model: nn.Module, text_model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"flow.{k}": v for k, v in model.state_dict().items()}
    state.update({f"text.{k}": v for k, v in text_model.state_dict().items()
                  if "token_embedding" not in k and "position_ids" not in k})
    return state


def save_flow_weights(path: Path, model: nn.Module, text_model: nn.Module, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in flow_state(model, text_model).items()}
    meta = dict(meta, config=vars(model.config) if hasattr(model, "config") else {})
    tmp = Path(str(path) + ".tmp")
    save_file(state, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def build_flow(config: FlowConfig = FlowConfig(), seed: int = 0) -> tuple[FlowTransformer, nn.Module]:
    torch.manual_seed(seed)
    return FlowTransformer(config), build_text_encoder()


def load_flow_host(path: Path | str = FLOW_WEIGHTS, shift: float = 1.0) -> FlowHost:
    """The trained flow toy as a host for :mod:`accdiffusion.lab.reference` (float32, eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"flow toy weights not found at {path}; run `python -m accdiffusion.lab.toy train --model flow`")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))  # type: ignore[attr-defined]
    config = FlowConfig(**meta.get("config", {}))
    model, text_model = build_flow(config)
    state = load_file(str(path))
    model.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("flow.")})
    missing, unexpected = text_model.load_state_dict(
        {k[5:]: v.float() for k, v in state.items() if k.startswith("text.")}, strict=False)
    bad = [k for k in missing if "token_embedding" not in k and "position_ids" not in k]
    if bad or unexpected:
        raise RuntimeError(f"flow toy weights do not fit the model: missing {bad}, unexpected {unexpected}")
    return FlowHost(model.eval(), load_tokenizer(str(TOKENIZER_DIR)), text_model=text_model.eval(), shift=shift,
                    meta=meta)
