"""Stand-ins of Forge Neo's Ernie-Image (Neo 2.26, the bundle ../shared/hosts/setup-forge-neo.sh builds),
written here, small and random, with the structure the backend relies on:

- ``ErnieImageModel`` (backend/nn/ernie.py:190-287): ``x_embedder`` a patch convolution (patch 1 on
  128-channel latents, :50-61), ``text_proj`` (:217), one ``adaLN_modulation`` shared by every block
  (:224, :275-278), ``layers`` of ``ErnieImageSharedAdaLNBlock`` (:150-174) over ONE sequence
  [image; text] — the image first (:244) — and the output read from the image's positions (:284).
  Position ids (:246-268): text (i, 0, 0) for i < T, image (T, row, col); the rotary embedding
  (``ErnieImageEmbedND3``, :28-47) per pair k of [[cos_top, −sin_top], [sin_bot, cos_bot]], the
  "top" angles of the first quarter of the frequencies and the "bottom" ones of the second, each
  repeated twice, [B, L, 1, D/2, 2, 2]; ``ErnieImageAttention`` (:97-136): ``to_q`` / ``to_k`` /
  ``to_v``, ``norm_q`` / ``norm_k`` RMSNorm on [B, L, H, D], then the split-half RoPE (channel k
  with k + D/2, comfy_kitchen's ``apply_rope_split_half``, :128), one softmax over the whole
  sequence (no mask in the model's calls, :280).
- the engine (backend/diffusion_engine/ernie.py, text_processing/ministral3_engine.py):
  ``text_processing_engine_ministral`` tokenizes the line with a PixtralProcessor
  (``tokenizer(images=None, text=...)``, :28-30) — its emphasis is "None" (:19, :66), so the
  parser gives the whole line as one literal piece (parsing.py:37-39: "(red:1.3)" is text), after
  one start token ``<s>``, no template (:37-60) — and gives one [L, D] tensor per line; ``id_start``
  1, ``id_pad`` 0, no ``id_end`` (:20-26); the tokens are 0-d tensors (``tokenize`` returns a
  tensor). The VAE is FLUX.2's (16 px per latent pixel).

The tokenizer is a byte-level BPE trained here with Mistral's ``<s>`` added before every text, like
Neo's real Ernie tokenizer (tests/test_neo_ernie.py runs the word spans on that one too when
``ACCDIFFUSION_NEO_DIR`` names a Neo checkout).
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

import dit_standins
from dit_standins import Chunk, DiTEngineStandIn, FlowKModelStandIn, PredictionDiscreteFlowStandIn
from forge_standins import ForgeObjects, UnetPatcherStandIn
from neo_standins import _CORPUS


@functools.lru_cache(maxsize=1)
def mistral_like_tokenizer():
    """A byte-level BPE whose post-processor puts ``<s>`` (id 1) before every text, as Neo's Ernie tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


class ProcessorStandIn:
    """transformers' PixtralProcessor as the engine calls it: ``(images=None, text=[...])`` and its ``tokenizer``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, images=None, text=None):
        return self.tokenizer(text)


class MinistralEngineStandIn:
    """ministral3_engine.py:17-131: the line as one literal piece (emphasis "None"), tokenized with
    its <s> first, one chunk of 0-d tensors; the embedding (a table here); one [L, width] tensor per line."""

    def __init__(self, tokenizer, width=24, seed=12):
        self.tokenizer = ProcessorStandIn(tokenizer)
        self.id_start, self.id_pad = 1, 0
        torch.manual_seed(seed)
        self.table = nn.Embedding(len(tokenizer), width).requires_grad_(False)
        nn.init.normal_(self.table.weight)

    def tokenize(self, texts):
        return torch.tensor(self.tokenizer(images=None, text=texts)["input_ids"])

    def tokenize_line(self, line):
        chunk = Chunk([])
        chunk.tokens = list(self.tokenize([line])[0])  # parse_prompt_attention(line, "None") = [[line, 1.0]]
        chunk.multipliers = [1.0] * len(chunk.tokens)
        return [chunk]

    def __call__(self, texts):
        return [self.table(torch.stack(self.tokenize_line(line)[0].tokens)) for line in texts]


# --- ErnieImageModel --------------------------------------------------------------------------------
def ernie_rotary(ids: torch.Tensor, head_dim: int, axes: tuple[int, int, int], theta: float = 256.0) -> torch.Tensor:
    """ids [B, L, 3] -> [B, L, 1, D/2, 2, 2] built as ErnieImageEmbedND3 builds it (ernie.py:28-47)."""
    angles = []
    for i, dim in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[..., i].double()[..., None] * omega)
    angle = torch.cat(angles, -1).float()  # [B, L, D/2]
    quarter = head_dim // 4
    top, bottom = angle[..., :quarter].repeat_interleave(2, -1), angle[..., quarter:].repeat_interleave(2, -1)
    rot = torch.stack([top.cos(), -top.sin(), bottom.sin(), bottom.cos()], -1)
    return rot.reshape(*rot.shape[:-1], 2, 2).unsqueeze(2)


def rotate_split_half(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]: channel k and k + D/2 mixed by pe's 2x2 matrix of pair k, written out per half."""
    half = x.shape[-1] // 2
    first, second = x[..., :half].float(), x[..., half:].float()
    m = pe.squeeze(2).unsqueeze(2)  # [B, L, 1, D/2, 2, 2]
    out_first = m[..., 0, 0] * first + m[..., 0, 1] * second
    out_second = m[..., 1, 0] * first + m[..., 1, 1] * second
    return torch.cat([out_first, out_second], -1).type_as(x)


def ernie_attention(q, k, v):
    """[B, L, H, D] -> [B, L, H·D]: one softmax over the whole sequence (backend.attention.attention_function)."""
    q, k, v = (t.movedim(1, 2) for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class ErnieImageAttentionStandIn(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(self, x, attention_mask=None, image_rotary_emb=None):
        b, n, _ = x.shape
        q = self.norm_q(self.to_q(x).view(b, n, self.heads, self.head_dim))
        k = self.norm_k(self.to_k(x).view(b, n, self.heads, self.head_dim))
        v = self.to_v(x).view(b, n, self.heads, self.head_dim)
        q, k = rotate_split_half(q, image_rotary_emb), rotate_split_half(k, image_rotary_emb)
        return self.to_out[0](ernie_attention(q, k, v))


class ErnieBlockStandIn(nn.Module):
    def __init__(self, dim, heads, mlp_hidden=None):
        super().__init__()
        self.adaLN_sa_ln, self.adaLN_mlp_ln = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.self_attention = ErnieImageAttentionStandIn(dim, heads)
        hidden = mlp_hidden or 2 * dim  # the bench sets the width whose FLOPs match Neo's gated FFN
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, rotary_pos_emb, temb, attention_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = temb
        h = self.adaLN_sa_ln(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.self_attention(h, attention_mask=attention_mask, image_rotary_emb=rotary_pos_emb)
        h = self.adaLN_mlp_ln(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


class ErnieStandIn(nn.Module):
    """ErnieImageModel, tiny: patch 1 on 128 channels, 4 layers of width 32, 2 heads."""

    def __init__(self, channels=128, text_dim=24, dim=32, heads=2, layers=4, axes=(4, 6, 6), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_size, self.axes, self.heads = 1, axes, heads
        self.x_embedder = nn.Conv2d(channels, dim, 1)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        self.time_embedding = nn.Linear(32, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.layers = nn.ModuleList([ErnieBlockStandIn(dim, heads) for _ in range(layers)])
        self.final_linear = nn.Linear(dim, channels)
        self.calls: list[dict] = []

    def forward(self, x, timesteps, context, **kwargs):
        b, c, h, w = x.shape
        self.calls.append({"shape": tuple(x.shape), "context": context.detach().clone(),
                           "t": timesteps.detach().clone()})
        img = self.x_embedder(x).flatten(2).transpose(1, 2)
        text = self.text_proj(context)
        length = text.shape[1]
        text_ids = torch.zeros(b, length, 3)
        text_ids[..., 0] = torch.arange(length, dtype=torch.float32)
        image_ids = torch.zeros(h, w, 3)
        image_ids[..., 0] = float(length)
        image_ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
        image_ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
        ids = torch.cat([image_ids.reshape(1, h * w, 3).expand(b, -1, -1), text_ids], 1)
        pe = ernie_rotary(ids, 32 // self.heads, self.axes)
        c_emb = self.time_embedding(dit_standins.sinusoid(timesteps, 32))
        temb = [t.unsqueeze(1) for t in self.adaLN_modulation(c_emb).chunk(6, dim=-1)]
        hidden = torch.cat([img, text], 1)
        for layer in self.layers:
            hidden = layer(hidden, pe, temb)
        out = self.final_linear(hidden)[:, :h * w]
        return out.transpose(1, 2).reshape(b, c, h, w)


class ErnieEngineStandIn(DiTEngineStandIn):
    """diffusion_engine/ernie.py: ErnieImageModel on a discrete-flow predictor (shift 3,
    ``use_shift``), the Ministral-3 engine as ``text_processing_engine_ministral``; FLUX.2's VAE
    (downscale ratio 16); conditioning = the engine's [L, D] tensor."""

    use_shift = True

    def __init__(self, tokenizer=None):
        self.family, self.is_sd3 = "ernie", False
        self.text_processing_engine_ministral = MinistralEngineStandIn(tokenizer or mistral_like_tokenizer())
        self.transformer = ErnieStandIn().requires_grad_(False)
        self.kmodel = FlowKModelStandIn(self.transformer, PredictionDiscreteFlowStandIn(shift=3.0))
        vae = types.SimpleNamespace(downscale_ratio=16)
        self.forge_objects_after_applying_lora = ForgeObjects(UnetPatcherStandIn(self.kmodel), vae)
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()
        self.encoded: list[str] = []

    def encode(self, prompt, is_negative=False, distilled_cfg_scale=None):
        self.encoded.append(prompt)
        with torch.no_grad():
            return self.text_processing_engine_ministral([prompt])[0]
