"""Stand-ins of Forge 2's joint-attention models (lllyasviel/stable-diffusion-webui-forge main,
commit dfdcbab6), written here, small and random, with the structure the adapter relies on:

- Flux (backend/nn/flux.py): ``double_blocks`` of DoubleStreamBlock (:181-264: img/txt streams,
  ``img_attn.norm`` / ``txt_attn.norm`` QKNorm returning (q, k) as [B, H, L, D] (:129-139, :222,
  :238), q/k/v concatenated text first (:240-244), RoPE applied in ``attention`` (:15-18, :43-49)
  with ``pe`` from EmbedND (:75-89: [B, 1, L, D/2, 2, 2])); ``single_blocks`` over [txt; img]
  (:267-307); forward (:400-422): pad to even, 2×2 patches, img_ids from the latent's own size,
  txt_ids zeros; inner_forward (:372-398): vec = time + guidance + pooled vector.
- Chroma (backend/nn/chroma.py): the same blocks, no pooled vector and no guidance input
  (forward(x, timestep, context), :285-304), ``distilled_guidance_layer`` (:157), blocks called
  with ``mod=`` (:270-274).
- SD 3.5 (backend/nn/mmditx.py): ``joint_blocks`` of JointBlock (:670-692) with ``context_block``
  / ``x_block`` whose ``attn`` has ``qkv``, ``ln_q``, ``ln_k`` (RMSNorm or Identity, :282-329),
  block_mixing (:636-667: context first); PatchEmbed 2×2 (:58-109), cropped_pos_embed from a
  square table, centred (:867-886), unpatchify (:888-906).
- backend/modules/k_prediction.py: PredictionFlux (:285-322, 'const', t = σ, sigmas from the mu
  time shift), PredictionDiscreteFlow (:253-282, t = 1000σ, shift), noise_scaling (:94-104),
  calculate_denoised (:81-92); backend/modules/k_model.py:25-46 apply_model.
- k_diffusion/external.py:41-73 ForgeScheduleLinker; modules/sd_samplers_kdiffusion.py:136-207
  sample / sample_img2img (start = predictor.noise_scaling), the "Simple" scheduler
  (modules/sd_schedulers.py simple_scheduler).
- the engines (backend/diffusion_engine/flux.py, chroma.py, sd35.py): conditioning dicts
  {crossattn: T5, vector: pooled CLIP-L, guidance} / T5 tensor / {crossattn: [CLIP-L|G padded to
  4096-wide; T5 zeros], vector}; the T5 engine (backend/text_processing/t5_engine.py: EOS 1, pad 0,
  min_length 256 for Flux, 1 for Chroma) with the real T5 tokenizer of the tiny checkpoints.

Every model records its calls (``calls``: input shape, image ids / position crop, context,
guidance) so tests can see what reached which window.
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import torch
from torch import nn

from a1111_standins import (ComposableScheduledPromptConditioning, ImageRNGStandIn, KDiffusionSamplerStandIn,
                            MulticondLearnedConditioning, ScheduledPromptConditioning, SAMPLER_FUNCS,
                            reconstruct_cond_batch, reconstruct_multicond_batch, InterruptedException)
from forge_standins import (ForgeCFGDenoiserStandIn, ForgeObjects, ForgeTxt2ImgStandIn, ForgeImg2ImgStandIn,
                            ForgeWebUIStandIn, UnetPatcherStandIn, concat_crossattn)

TINY = Path(__file__).resolve().parents[2] / "shared" / "tinymodel" / "forge" / "hf"


# --- pieces ---------------------------------------------------------------------------------------
def sinusoid(t: torch.Tensor, dim: int, factor: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (t.float() * factor)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


def rotary(ids: torch.Tensor, axes: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """ids [B, L, n_axes] -> [B, 1, L, D/2, 2, 2], per channel pair [[cos, -sin], [sin, cos]]."""
    parts = []
    for i, dim in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = ids[..., i].double()[..., None] * omega
        c, s = angle.cos(), angle.sin()
        parts.append(torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2))
    return torch.cat(parts, -3).unsqueeze(1).float()


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] rotated pairwise as complex numbers by the angles in pe (cos = pe[..,0,0],
    sin = pe[..,1,0]): the same rotation as Forge's apply_rope, computed another way."""
    cos, sin = pe[..., 0, 0], pe[..., 1, 0]
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = torch.complex(cos, sin).to(z.dtype)
    return torch.view_as_real(z * rot).reshape(*x.shape).type_as(x)


def joint_attention(q, k, v):
    """[B, H, L, D] -> [B, L, H·D] (backend.attention.attention_function, skip_reshape)."""
    out = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, q, k, v):
        return self.query_norm(q), self.key_norm(k)


class StreamAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj, self.norm = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), QKNorm(dim // heads)

    def split(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        self.num_heads = heads
        self.img_mod, self.txt_mod = nn.Linear(dim, 6 * dim), nn.Linear(dim, 6 * dim)
        self.img_attn, self.txt_attn = StreamAttention(dim, heads), StreamAttention(dim, heads)
        self.img_mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))

    def forward(self, img, txt, vec=None, pe=None, mod=None):
        ln = lambda x: nn.functional.layer_norm(x, x.shape[-1:])
        mi = (self.img_mod(nn.functional.silu(vec)) if mod is None else mod[0])[:, None].chunk(6, -1)
        mt = (self.txt_mod(nn.functional.silu(vec)) if mod is None else mod[1])[:, None].chunk(6, -1)
        iq, ik, iv = self.img_attn.split((1 + mi[1]) * ln(img) + mi[0])
        tq, tk, tv = self.txt_attn.split((1 + mt[1]) * ln(txt) + mt[0])
        q, k, v = torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2)
        attn = joint_attention(rotate(q, pe), rotate(k, pe), v)
        ta, ia = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + mi[2] * self.img_attn.proj(ia)
        img = img + mi[5] * self.img_mlp((1 + mi[4]) * ln(img) + mi[3])
        txt = txt + mt[2] * self.txt_attn.proj(ta)
        txt = txt + mt[5] * self.txt_mlp((1 + mt[4]) * ln(txt) + mt[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    """flux.py:267-307: one qkv over the joined [txt; img] sequence, ``norm`` (QKNorm) on the
    block itself returning (q, k) as [B, H, L, D], RoPE in ``attention``."""

    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        self.num_heads = heads
        self.modulation, self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm = QKNorm(dim // heads)
        self.mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))

    def forward(self, x, vec=None, pe=None, mod=None):
        m = (self.modulation(nn.functional.silu(vec)) if mod is None else mod)[:, None].chunk(3, -1)
        h = (1 + m[1]) * nn.functional.layer_norm(x, x.shape[-1:]) + m[0]
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return x + m[2] * (self.proj(joint_attention(rotate(q, pe), rotate(k, pe), v)) + self.mlp(h))


class FluxStandIn(nn.Module):
    """IntegratedFluxTransformer2DModel's structure (nn/flux.py:326-422), tiny."""

    guidance_embed = True

    def __init__(self, channels=16, context_dim=64, vec_dim=32, dim=32, heads=2, depth=2, single=1,
                 axes=(4, 6, 6), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.axes, self.num_heads = axes, heads
        self.img_in, self.txt_in = nn.Linear(channels * 4, dim), nn.Linear(context_dim, dim)
        self.time_in = nn.Linear(32, dim)
        self.vector_in = nn.Linear(vec_dim, dim)
        self.guidance_in = nn.Linear(32, dim)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(dim, heads) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(dim, heads) for _ in range(single)])
        self.final_layer = nn.Linear(dim, channels * 4)
        self.calls: list[dict] = []
        self.tap = None  # tests: (x, t, context, ...) -> replacement output

    def conditioning_vector(self, t, y, guidance):
        vec = self.time_in(sinusoid(t, 32))
        if guidance is None:
            raise ValueError("Didn't get guidance strength for guidance distilled model.")
        return vec + self.guidance_in(sinusoid(guidance, 32)) + self.vector_in(y)

    def forward(self, x, timestep, context, y=None, guidance=None, **kwargs):
        b, c, h, w = x.shape
        x = nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="circular")
        gh, gw = x.shape[-2] // 2, x.shape[-1] // 2
        img = x.reshape(b, c, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * 4)
        ids = torch.zeros(gh, gw, 3)
        ids[..., 1] += torch.arange(gh, dtype=torch.float32)[:, None]
        ids[..., 2] += torch.arange(gw, dtype=torch.float32)[None, :]
        img_ids = ids.reshape(1, gh * gw, 3).expand(b, -1, -1)
        txt_ids = torch.zeros(b, context.shape[1], 3)
        self.calls.append({"shape": tuple(x.shape), "img_ids": img_ids[0].clone(), "context": context.detach().clone(),
                           "t": timestep.detach().clone(), "y": None if y is None else y.detach().clone(),
                           "guidance": None if guidance is None else guidance.detach().clone()})
        if self.tap is not None:
            return self.tap(x[..., :h, :w], timestep, context)
        pe = rotary(torch.cat([txt_ids, img_ids], 1), self.axes)
        out = self.run_blocks(self.img_in(img), self.txt_in(context), timestep, y, guidance, pe)
        out = out.reshape(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * 2, gw * 2)
        return out[..., :h, :w]

    def run_blocks(self, img, txt, t, y, guidance, pe):
        vec = self.conditioning_vector(t, y, guidance)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe)
        return self.final_layer(x[:, txt.shape[1]:])


class ChromaStandIn(FluxStandIn):
    """IntegratedChromaTransformer2DModel: modulations from ``distilled_guidance_layer``, no y, no guidance."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        dim = self.img_in.out_features
        self.distilled_guidance_layer = nn.Linear(32, dim)

    def forward(self, x, timestep, context, **kwargs):
        return super().forward(x, timestep, context, y=None, guidance=None)

    def run_blocks(self, img, txt, t, y, guidance, pe):
        vec = self.distilled_guidance_layer(sinusoid(t, 32))
        for block in self.double_blocks:  # chroma.py:270-274: block(img=, txt=, mod=, pe=)
            mods = (block.img_mod(nn.functional.silu(vec)), block.txt_mod(nn.functional.silu(vec)))
            img, txt = block(img=img, txt=txt, mod=mods, pe=pe)
        x = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            x = block(x, mod=block.modulation(nn.functional.silu(vec)), pe=pe)
        return self.final_layer(x[:, txt.shape[1]:])


class MMAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln_q, self.ln_k = nn.RMSNorm(dim // heads, eps=1e-6), nn.RMSNorm(dim // heads, eps=1e-6)

    def pre_attention(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).movedim(2, 0)
        return self.ln_q(q).reshape(b, n, -1), self.ln_k(k).reshape(b, n, -1), v.reshape(b, n, -1)


class DismantledBlock(nn.Module):
    def __init__(self, dim, heads, pre_only=False, mlp_ratio=2):
        super().__init__()
        self.pre_only = pre_only
        self.attn, self.mod = MMAttention(dim, heads), nn.Linear(dim, 6 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)), nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))


class JointBlock(nn.Module):
    def __init__(self, dim, heads, pre_only=False, mlp_ratio=2):
        super().__init__()
        self.context_block = DismantledBlock(dim, heads, pre_only, mlp_ratio)
        self.x_block = DismantledBlock(dim, heads, mlp_ratio=mlp_ratio)

    def forward(self, context, x, c):
        ln = lambda t: nn.functional.layer_norm(t, t.shape[-1:])
        mc = self.context_block.mod(nn.functional.silu(c))[:, None].chunk(6, -1)
        mx = self.x_block.mod(nn.functional.silu(c))[:, None].chunk(6, -1)
        cq, ck, cv = self.context_block.attn.pre_attention((1 + mc[1]) * ln(context) + mc[0])
        xq, xk, xv = self.x_block.attn.pre_attention((1 + mx[1]) * ln(x) + mx[0])
        heads = self.x_block.attn.num_heads
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
        attn = joint_attention(split(torch.cat([cq, xq], 1)), split(torch.cat([ck, xk], 1)), split(torch.cat([cv, xv], 1)))
        ca, xa = attn[:, :context.shape[1]], attn[:, context.shape[1]:]
        x = x + mx[2] * self.x_block.attn.proj(xa)
        x = x + mx[5] * self.x_block.mlp((1 + mx[4]) * ln(x) + mx[3])
        if self.context_block.pre_only:
            return None, x
        context = context + mc[2] * self.context_block.attn.proj(ca)
        return context + mc[5] * self.context_block.mlp((1 + mc[4]) * ln(context) + mc[3]), x


class MMDiTStandIn(nn.Module):
    """MMDiTX's structure (mmditx.py:740-971), tiny: 2×2 patches, a square position table cropped
    about its centre for the input's size, context embedder over the 4096-wide [CLIP; T5] context."""

    def __init__(self, channels=16, context_dim=4096, vec_dim=48, dim=32, heads=2, depth=2, pos_max=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.pos_embed_max_size = pos_max
        self.x_embedder = nn.Conv2d(channels, dim, 2, 2)
        self.pos_embed = nn.Parameter(torch.randn(1, pos_max * pos_max, dim) * 0.1)
        self.t_embedder, self.y_embedder = nn.Linear(32, dim), nn.Linear(vec_dim, dim)
        self.context_embedder = nn.Linear(context_dim, dim)
        self.joint_blocks = nn.ModuleList([JointBlock(dim, heads, pre_only=i == depth - 1) for i in range(depth)])
        self.final_layer = nn.Linear(dim, channels * 4)
        self.channels = channels
        self.calls: list[dict] = []
        self.tap = None

    def cropped_pos_embed(self, h, w):
        top, left = (self.pos_embed_max_size - h) // 2, (self.pos_embed_max_size - w) // 2
        table = self.pos_embed.reshape(1, self.pos_embed_max_size, self.pos_embed_max_size, -1)
        return table[:, top:top + h, left:left + w].reshape(1, h * w, -1), (top, left)

    def forward(self, x, t, y=None, context=None, control=None, transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        pos, crop = self.cropped_pos_embed(h // 2, w // 2)
        self.calls.append({"shape": tuple(x.shape), "crop": crop, "context": context.detach().clone(),
                           "t": t.detach().clone(), "y": None if y is None else y.detach().clone()})
        if self.tap is not None:
            return self.tap(x, t, context)
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + pos
        vec = self.t_embedder(sinusoid(t, 32, factor=1.0)) + self.y_embedder(y)
        ctx = self.context_embedder(context)
        for block in self.joint_blocks:
            ctx, tokens = block(ctx, tokens, c=vec)
        out = self.final_layer(tokens).reshape(b, h // 2, w // 2, 2, 2, c)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, c, h, w)


# --- predictors and the k-model -------------------------------------------------------------------
class PredictionFluxStandIn(nn.Module):
    prediction_type, sigma_data = "const", 1.0

    def __init__(self, mu=1.15):
        super().__init__()
        t = torch.arange(1, 10001) / 10000
        self.register_buffer("sigmas", math.exp(mu) / (math.exp(mu) + (1 / t - 1)))

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return timestep

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(-1, 1, 1, 1)

    def percent_to_sigma(self, percent):
        return 1.0 if percent <= 0 else 0.0 if percent >= 1 else 1.0 - percent


class PredictionDiscreteFlowStandIn(PredictionFluxStandIn):
    def __init__(self, shift=3.0):
        nn.Module.__init__(self)
        self.shift = shift
        self.register_buffer("sigmas", self.sigma(torch.arange(1, 1001, dtype=torch.float32)))

    def timestep(self, sigma):
        return sigma * 1000

    def sigma(self, timestep):
        t = timestep / 1000.0
        return self.shift * t / (1 + (self.shift - 1) * t)


class FlowKModelStandIn(nn.Module):
    """k_model.py:25-46 for a flow predictor: x in as it is, t = predictor.timestep(σ), the
    conditioning's extra keys passed to the transformer, denoised = x − σ·output."""

    def __init__(self, transformer, predictor):
        super().__init__()
        self.diffusion_model, self.predictor = transformer, predictor
        self.memory_calls: list = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        out = self.diffusion_model(xc, self.predictor.timestep(t).float(), context=c_crossattn, control=control,
                                   transformer_options=transformer_options, **kwargs).float()
        return self.predictor.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape):
        self.memory_calls.append(list(input_shape))
        return 0


# --- text engines -----------------------------------------------------------------------------------
class Chunk:
    def __init__(self, tokens):
        self.tokens, self.multipliers = tokens, [1.0] * len(tokens)


class T5EngineStandIn:
    """t5_engine.py:19-158: tokens + EOS (1), padded with 0 to min_length; an embedding table for T5."""

    id_end, id_pad = 1, 0

    def __init__(self, tokenizer, min_length=256, width=64, seed=3):
        self.tokenizer, self.min_length = tokenizer, min_length
        self.table = nn.Embedding(32128, width).requires_grad_(False)
        torch.manual_seed(seed)
        nn.init.normal_(self.table.weight)

    def tokenize(self, texts):
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def tokenize_line(self, line):
        tokens = self.tokenize([line])[0] + [self.id_end]
        tokens += [self.id_pad] * max(0, self.min_length - len(tokens))
        return [Chunk(tokens)], len(tokens)

    def __call__(self, texts):
        return torch.stack([self.table(torch.tensor(self.tokenize_line(t)[0][0].tokens)) for t in texts])


class ClipEngineStandIn:
    """classic_engine.py: 77-token chunks [BOS, ≤75 ids, EOS, pad with EOS]; pooled = the EOS state."""

    def __init__(self, tokenizer, width, seed):
        self.tokenizer = tokenizer
        self.id_start, self.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.id_pad = self.id_end
        torch.manual_seed(seed)
        self.table = nn.Embedding(tokenizer.vocab_size, width).requires_grad_(False)

    def tokenize(self, texts):
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def tokenize_line(self, line):
        ids = self.tokenize([line])[0]
        chunks = [ids[i:i + 75] for i in range(0, max(1, len(ids)), 75)]
        return [Chunk([self.id_start] + c + [self.id_end] * (76 - len(c))) for c in chunks], len(ids)

    def __call__(self, texts):
        outs = [self.table(torch.tensor([t for c in self.tokenize_line(x)[0] for t in c.tokens])) for x in texts]
        return torch.stack(outs), torch.stack([o[-1] for o in outs])


# --- the engines ------------------------------------------------------------------------------------
class DiTEngineStandIn:
    """ForgeDiffusionEngine for Flux / Chroma / SD 3.5: forge_objects, the text engines,
    get_learned_conditioning (with the prompt's distilled_cfg_scale, 3.5 when it has none)."""

    is_sd1 = is_sd2 = is_sdxl = is_inpaint = False

    def __init__(self, family: str, clip_tokenizer, t5_tokenizer):
        self.family = family
        self.is_sd3 = family == "sd35"
        if family == "flux":
            transformer, predictor = FluxStandIn(), PredictionFluxStandIn()
            self.text_processing_engine_l = ClipEngineStandIn(clip_tokenizer, 32, seed=5)
            self.text_processing_engine_t5 = T5EngineStandIn(t5_tokenizer, 256)
        elif family == "chroma":
            transformer, predictor = ChromaStandIn(), PredictionFluxStandIn(mu=1.0)
            self.text_processing_engine_t5 = T5EngineStandIn(t5_tokenizer, 1)
        else:
            transformer, predictor = MMDiTStandIn(), PredictionDiscreteFlowStandIn()
            self.text_processing_engine_l = ClipEngineStandIn(clip_tokenizer, 16, seed=6)
            self.text_processing_engine_g = ClipEngineStandIn(clip_tokenizer, 32, seed=7)
            self.text_processing_engine_t5 = T5EngineStandIn(t5_tokenizer, 256)
        self.transformer = transformer.requires_grad_(False)
        self.kmodel = FlowKModelStandIn(self.transformer, predictor)
        self.forge_objects_after_applying_lora = ForgeObjects(UnetPatcherStandIn(self.kmodel))
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()
        self.encoded: list[str] = []

    def encode(self, prompt: str, is_negative: bool = False, distilled_cfg_scale: float | None = None):
        self.encoded.append(prompt)
        with torch.no_grad():
            if self.family == "chroma":
                return self.text_processing_engine_t5([prompt])[0]
            if self.family == "flux":
                _, pooled = self.text_processing_engine_l([prompt])
                return {"crossattn": self.text_processing_engine_t5([prompt])[0], "vector": pooled[0],
                        "guidance": torch.tensor(distilled_cfg_scale or 3.5)}
            cond_l, pooled_l = self.text_processing_engine_l([prompt])
            cond_g, pooled_g = self.text_processing_engine_g([prompt])
            lg = nn.functional.pad(torch.cat([cond_l, cond_g], -1), (0, 4096 - 48))
            t5 = torch.zeros(1, 256, 4096)  # sd3_enable_t5 off (the default)
            return {"crossattn": torch.cat([lg, t5], 1)[0], "vector": torch.cat([pooled_l, pooled_g], -1)[0]}


def sampling_function(model: DiTEngineStandIn, x, sigma, cond, uncond, cond_scale):
    """calc_cond_uncond_batch + CFG (sampling_function.py:154-322) for plain prompts: condition
    keys from compile_conditions (condition.py:91-119), uncond dropped at cfg 1 (:295), chunks
    [uncond, cond] (:187), the wrapper called as at :270-271."""
    unet = model.forge_objects.unet
    options = unet.model_options
    b = x.shape[0]
    entries = [(cond, 0)] + ([(uncond, 1)] if uncond is not None and not math.isclose(cond_scale, 1.0) else [])
    entries.reverse()
    unet.memory_required([len(entries) * b, *x.shape[1:]])
    layout = [kind for _, kind in entries]
    text = lambda e: e["crossattn"] if isinstance(e, dict) else e
    c = {"c_crossattn": concat_crossattn([text(e) for e, _ in entries])}
    if isinstance(cond, dict):
        c["y"] = torch.cat([e["vector"] for e, _ in entries])
        if "guidance" in cond:
            c["guidance"] = torch.cat([e["guidance"] for e, _ in entries])
    topts = dict(options["transformer_options"])
    topts["cond_or_uncond"], topts["sigmas"] = layout, sigma
    c["transformer_options"] = topts
    x_in, t_in = torch.cat([x] * len(entries)), torch.cat([sigma] * len(entries))
    if unet.controlnet_linked_list is not None:
        c["control"] = unet.controlnet_linked_list.get_control(x_in, t_in, dict(c), len(entries))
    if "model_function_wrapper" in options:
        out = options["model_function_wrapper"](model.kmodel.apply_model, {"input": x_in, "timestep": t_in, "c": c,
                                                                          "cond_or_uncond": layout})
    else:
        out = model.kmodel.apply_model(x_in, t_in, **c)
    chunks = dict(zip(layout, out.chunk(len(entries))))
    if 1 not in chunks:
        return chunks[0]
    return chunks[1] + (chunks[0] - chunks[1]) * cond_scale


def stack_batch(conds):
    """reconstruct_*_batch stack rows; Flux's dict rows carry a 0-dim guidance."""
    return conds


class DiTCFGDenoiserStandIn(ForgeCFGDenoiserStandIn):
    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        state = self.sampler.webui.state
        if state.interrupted or state.skipped:
            raise InterruptedException
        _, cond_t = reconstruct_multicond_batch(cond, self.step)
        uncond_t = reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        out = sampling_function(self.sampler.model, x, sigma, cond_t, uncond_t, cond_scale)
        self.step += 1
        return out


class FlowScheduleLinkerStandIn(nn.Module):
    """k_diffusion/external.py:41-73 ForgeScheduleLinker over a flow predictor."""

    def __init__(self, predictor):
        super().__init__()
        self.predictor = predictor

    @property
    def sigmas(self):
        return self.predictor.sigmas

    def sigma_to_t(self, sigma, quantize=None):
        return self.predictor.timestep(sigma)

    def t_to_sigma(self, t):
        return self.predictor.sigma(t)


class FlowSamplerStandIn(KDiffusionSamplerStandIn):
    """sd_samplers_kdiffusion.py:136-207 with the "Simple" scheduler; starts are the predictor's
    noise_scaling (:147, :207)."""

    def __init__(self, funcname, model, webui):
        import k_diffusion.sampling

        self.func = getattr(k_diffusion.sampling, funcname)
        self.webui, self.model = webui, model
        self.model_wrap = FlowScheduleLinkerStandIn(model.kmodel.predictor)
        self.model_wrap_cfg = DiTCFGDenoiserStandIn(self)
        self.last_latent = None

    def simple_sigmas(self, n):
        sigmas = self.model_wrap.sigmas
        ss = len(sigmas) / n
        return torch.tensor([float(sigmas[-(1 + int(i * ss))]) for i in range(n)] + [0.0])

    def sample(self, p, x, c, uc, image_conditioning=None):
        sigmas = self.simple_sigmas(p.steps)
        xi = self.model_wrap.predictor.noise_scaling(sigmas[0], x, torch.zeros_like(x))
        return self._run(p, xi, sigmas, c, uc, image_conditioning)

    def sample_img2img(self, p, x, noise, c, uc, steps=None, image_conditioning=None):
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999))
        t_enc = requested - 1
        sigma_sched = self.simple_sigmas(steps)[steps - t_enc - 1:]
        self.starts = getattr(self, "starts", []) + [(x.clone(), noise.clone(), float(sigma_sched[0]))]
        xi = self.model_wrap.predictor.noise_scaling(sigma_sched[0], noise, x)
        return self._run(p, xi, sigma_sched, c, uc, image_conditioning)


class DiTWebUIStandIn(ForgeWebUIStandIn):
    def create_sampler(self, name, model):
        sampler = FlowSamplerStandIn(SAMPLER_FUNCS[name], model, self)
        self.samplers.append(sampler)
        return sampler

    def text_embedder(self, model):
        from accdiffusion.flows.webui import WebUI

        return WebUI.text_embedder(None, model)  # the real rule (it reads only the model)

    def decode(self, model, latent):
        return torch.tanh(torch.nn.functional.interpolate(latent[:, :3].float(), scale_factor=8, mode="nearest"))

    def encode(self, model, pixels, seed=None):
        x = torch.nn.functional.avg_pool2d(pixels.float() * 2 - 1, 8).clamp(-0.95, 0.95)
        x = torch.atanh(x)
        return torch.cat([x] * 5 + [x[:, :1]], 1)


class DiTTxt2ImgStandIn(ForgeTxt2ImgStandIn):
    """txt2img on a flow model: 16-channel latents, cfg 1 + distilled CFG for Flux (hires:
    ``hr_distilled_cfg``), the "Simple" scheduler."""

    def __init__(self, model, webui, prompts, distilled_cfg_scale=3.5, hr_distilled_cfg=2.5, **kwargs):
        kwargs.setdefault("cfg_scale", 1.0 if model.family == "flux" else 4.0)
        super().__init__(model, webui, prompts, **kwargs)
        self.distilled_cfg_scale, self.hr_distilled_cfg = distilled_cfg_scale, hr_distilled_cfg
        self.rng = ImageRNGStandIn((16, self.height // 8, self.width // 8), self.seeds)

    def conds(self, prompts, negative: bool = False, guidance=None):
        guidance = guidance or self.distilled_cfg_scale
        encoded = [self.sd_model.encode(t, negative, guidance) for t in prompts]
        if negative:
            return [[ScheduledPromptConditioning(self.steps, e)] for e in encoded]
        return MulticondLearnedConditioning((len(prompts),), [
            [ComposableScheduledPromptConditioning([ScheduledPromptConditioning(self.steps, e)])] for e in encoded])

    def calculate_hr_conds(self):
        if self.hr_c is None:
            self.hr_c = self.conds(self.hr_prompts, guidance=self.hr_distilled_cfg)
            self.hr_uc = self.conds(self.negative_prompts, negative=True, guidance=self.hr_distilled_cfg)


class DiTImg2ImgStandIn(ForgeImg2ImgStandIn):
    def __init__(self, model, webui, prompts, init_images, distilled_cfg_scale=3.5, **kwargs):
        kwargs.setdefault("cfg_scale", 1.0 if model.family == "flux" else 4.0)
        super().__init__(model, webui, prompts, init_images, **kwargs)
        self.distilled_cfg_scale = distilled_cfg_scale

    def conds(self, prompts, negative: bool = False):
        encoded = [self.sd_model.encode(t, negative, self.distilled_cfg_scale) for t in prompts]
        if negative:
            return [[ScheduledPromptConditioning(self.steps, e)] for e in encoded]
        return MulticondLearnedConditioning((len(prompts),), [
            [ComposableScheduledPromptConditioning([ScheduledPromptConditioning(self.steps, e)])] for e in encoded])


def load_tokenizers():
    from transformers import AutoTokenizer

    from accdiffusion.lab.reference import load_tokenizer

    clip = load_tokenizer(str(TINY.parents[1] / "clip-text-tiny"))
    t5 = AutoTokenizer.from_pretrained(str(TINY / "tiny-flux" / "tokenizer_2"))
    return clip, t5
