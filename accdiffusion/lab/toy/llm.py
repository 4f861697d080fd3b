"""The single-stream flow toy with an LLM-like text encoder (``--model flow-llm``): a small
NextDiT (Z-Image / Lumina 2) at the flow toy's scale, trained by rectified flow on the same
scenes and latents as :mod:`.flow`.

Text: a tiny *causal* transformer over a byte-level word vocabulary (own tokenizer: a word is
one token when the vocabulary has it, else its bytes), the caption wrapped in a chat template
("<|im_start|>user\\n{caption}<|im_end|>\\n<|im_start|>assistant\\n": 3 template tokens before it,
5 after), no padding to a fixed length, its hidden states as the context and no pooled vector
(Z-Image modulates by the timestep alone).

Transformer (after the published NextDiT design, own code): a caption refiner block (text only,
no modulation), a noise refiner block (image only, modulated), then single-stream joint blocks
over [caption; image] with timestep modulation. Rotary ids on three axes as NextDiT's: caption
token k at (k + 1, 0, 0), image token (row, col) at (L + 1, row, col) with L the row's own
caption length; captions of one batch are padded to the longest and the pad keys masked, so a
row's output does not depend on the rows it is batched with.

The word positions of a prompt are found inside the template by the product's own LLM path
(:func:`accdiffusion.flows.job.word_positions`: each token spelled back to bytes, the template's
text stepped over), through a stand-in of a WebUI text engine (:class:`ToyLLMEngine`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...method.words import Word, _byte_level_alphabet
from ..reference import RowCond
from .flow import (PATCH, FlowAttentionRecorder, FlowHost, Modulation, QKV, RMSNorm, mlp,
                   modulate, rope_angles, timestep_embedding)
from .scenes import COLOURS, SHAPES

LLM_WEIGHTS = Path(__file__).resolve().parent / "toy-flow-llm-weights.safetensors"
# Z-Image's chat template (Qwen3's user turn, the assistant turn opened): the caption sits inside
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD = "<|endoftext|>"
MAX_TEXT = 48  # template included; longer captions are cut (the scene captions take ≤ 21)
# words the vocabulary holds whole (each also with a leading space, as byte-level BPE spells them)
VOCAB_WORDS = ("a", "an", "and", "with", "the", "user", "assistant", *COLOURS, *SHAPES)
_PIECES = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


# --- tokenizer -----------------------------------------------------------------------------------
def spell(text: str) -> str:
    """Byte-level spelling of ``text`` (GPT-2's alphabet, the one ``words.token_bytes`` reads back)."""
    char_of = {b: c for c, b in _byte_level_alphabet().items()}
    return "".join(char_of[b] for b in text.encode("utf-8"))


def build_vocabulary() -> list[str]:
    """Special tokens, the 256 single bytes, then the whole words (plain and after a space)."""
    char_of = {b: c for c, b in _byte_level_alphabet().items()}
    words = [spell(w) for w in VOCAB_WORDS] + [spell(" " + w) for w in VOCAB_WORDS]
    return list(SPECIAL_TOKENS) + [char_of[b] for b in range(256)] + words


@dataclass
class ToyLLMTokenizer:
    """Byte-level word tokenizer: special tokens by their text, then GPT-2-like pieces (a word with
    its leading space, punctuation, whitespace), each one token when the vocabulary has it, else
    one token per byte."""
    vocab: list[str] = field(default_factory=build_vocabulary)

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self._special = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def pad_token_id(self) -> int:
        return self.index[PAD]

    @property
    def special_ids(self) -> set[int]:
        return {self.index[s] for s in SPECIAL_TOKENS}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._special.split(text):
            if part in self.index and part in SPECIAL_TOKENS:
                ids.append(self.index[part])
                continue
            for piece in _PIECES.findall(part):
                spelled = spell(piece)
                ids.extend([self.index[spelled]] if spelled in self.index else [self.index[c] for c in spelled])
        return ids

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.vocab[i] for i in ids]


@dataclass
class _Chunk:
    tokens: list[int]


@dataclass
class ToyLLMEngine:
    """Just what :func:`accdiffusion.flows.job.word_positions` reads of a WebUI LLM text engine
    (Neo's Qwen3 engine): ``tokenize_line`` → chunks of ids, ``tokenizer.convert_ids_to_tokens``
    and the ``llama_template``; no ``strip_template`` (Z-Image keeps the template's hidden states)."""
    host: "LLMFlowHost"

    @property
    def tokenizer(self) -> ToyLLMTokenizer:
        return self.host.tokenizer

    @property
    def llama_template(self) -> str:
        return TEMPLATE

    def tokenize_line(self, line: str) -> list[_Chunk]:
        return [_Chunk(self.host.context_ids(line))]


# --- text encoder ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMFlowConfig:
    dim: int = 96
    heads: int = 4
    joint_blocks: int = 4  # single-stream over [caption; image]: the recorded blocks
    caption_refiner_blocks: int = 1
    noise_refiner_blocks: int = 1
    mlp_ratio: int = 3
    channels: int = 4
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_text: int = MAX_TEXT

    @property
    def blocks(self) -> int:
        """Blocks that attend jointly (the recorder's block indices 0…joint_blocks − 1)."""
        return self.joint_blocks


class CausalLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = mlp(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(out.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class CausalTextEncoder(nn.Module):
    """A tiny decoder-only LM body: token and learned position embeddings, causal layers, a final
    norm. Right padding cannot change the tokens before it (causal), so a batch padded to its
    longest row gives each row its own hidden states. It has no LM head and no pretraining: it is
    trained with the transformer, so its last layer is the one read (Z-Image reads Qwen3's
    second-to-last, but a layer after the one read would get no gradient here)."""

    def __init__(self, vocab: int, config: LLMFlowConfig):
        super().__init__()
        d = config.text_dim
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Parameter(torch.randn(config.max_text, d) * 0.02)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.layers = nn.ModuleList(CausalLayer(d, config.text_heads) for _ in range(config.text_layers))
        self.norm = RMSNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions[:ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# --- transformer ------------------------------------------------------------------------------------
def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x [B, H, N, D] by per-row ``angles`` [B, N, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x)


def sequence_positions(lengths: torch.Tensor, text_len: int, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NextDiT's rotary ids, per row: caption token k at (k + 1, 0, 0) (padding too: masked),
    image token (r, c) at (L + 1, r, c) with L the row's caption length → ([B, T, 3], [B, gh·gw, 3])."""
    b = lengths.shape[0]
    text = torch.zeros(b, text_len, 3)
    text[..., 0] = torch.arange(1, text_len + 1, dtype=torch.float32)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    grid = torch.stack([rows.flatten(), cols.flatten()], -1).float()
    image = torch.cat([(lengths.float() + 1)[:, None, None].expand(b, gh * gw, 1),
                       grid[None].expand(b, -1, -1)], -1)
    return text.to(lengths.device), image.to(lengths.device)


def angles_of(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, N, 3] rotary ids → [B, N, head_dim/2] angles (the flow toy's per-axis frequencies)."""
    return rope_angles(positions.flatten(0, 1), head_dim).unflatten(0, positions.shape[:2])


class NextBlock(nn.Module):
    """Attention then MLP, each pre-normed and (when modulated) shifted, scaled and gated by the
    timestep vector (adaLN-Zero: a modulated block starts as the identity). ``block``: the index
    the recorder files the block under (None: a refiner, never recorded — no text share)."""

    def __init__(self, config: LLMFlowConfig, modulated: bool):
        super().__init__()
        d = config.dim
        self.mod = Modulation(d, 6) if modulated else None
        self.qkv = QKV(d, config.heads)
        self.proj = nn.Linear(d, d)
        self.mlp = mlp(d, config.mlp_ratio)

    def forward(self, x: torch.Tensor, vec: torch.Tensor | None, angles: torch.Tensor, key_mask: torch.Tensor | None,
                text_len: int = 0, block: int | None = None,
                recorder: FlowAttentionRecorder | None = None) -> torch.Tensor:
        if self.mod is not None:
            shift, scale, gate, shift2, scale2, gate2 = self.mod(vec)
        else:
            zero = x.new_zeros(x.shape[0], x.shape[-1])
            shift, scale, gate, shift2, scale2, gate2 = zero, zero, zero + 1, zero, zero, zero + 1
        q, k, v = self.qkv(modulate(F.layer_norm(x, x.shape[-1:]), shift, scale))
        q, k = rotate(q, angles), rotate(k, angles)
        if recorder is not None and recorder.active and block is not None:
            recorder.observe(block, q, k, text_len, key_mask)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        x = x + gate[:, None] * self.proj(out)
        return x + gate2[:, None] * self.mlp(modulate(F.layer_norm(x, x.shape[-1:]), shift2, scale2))


class LLMFlowTransformer(nn.Module):
    """v(x, σ, caption hidden states [B, T, text_dim], caption mask [B, T]) for latents of any even size."""

    def __init__(self, config: LLMFlowConfig = LLMFlowConfig()):
        super().__init__()
        self.config = config
        d, p = config.dim, PATCH
        self.img_in = nn.Linear(config.channels * p * p, d)
        self.txt_in = nn.Sequential(RMSNorm(config.text_dim), nn.Linear(config.text_dim, d))  # NextDiT's cap_embedder
        self.time_in = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.caption_refiner = nn.ModuleList(NextBlock(config, False) for _ in range(config.caption_refiner_blocks))
        self.noise_refiner = nn.ModuleList(NextBlock(config, True) for _ in range(config.noise_refiner_blocks))
        self.layers = nn.ModuleList(NextBlock(config, True) for _ in range(config.joint_blocks))
        self.final_mod = Modulation(d, 2)
        self.final = nn.Linear(d, config.channels * p * p)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)
        self.recorder: FlowAttentionRecorder | None = None  # set by FlowAttentionRecorder.attach

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h % PATCH or w % PATCH:
            raise ValueError(f"flow-llm toy: latent {h}×{w} is not a multiple of the patch size {PATCH}")
        gh, gw = h // PATCH, w // PATCH
        tokens = x.reshape(b, c, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * PATCH * PATCH)
        img, txt = self.img_in(tokens), self.txt_in(context)
        vec = self.time_in(timestep_embedding(sigma.reshape(-1).expand(b), self.config.dim).to(x))
        text_len = txt.shape[1]
        head_dim = self.config.dim // self.config.heads
        text_pos, image_pos = sequence_positions(text_mask.sum(1), text_len, gh, gw)
        text_angles, image_angles = angles_of(text_pos, head_dim), angles_of(image_pos, head_dim)
        for block in self.caption_refiner:
            txt = block(txt, None, text_angles, text_mask)
        for block in self.noise_refiner:
            img = block(img, vec, image_angles, None)
        joined = torch.cat([txt, img], 1)
        key_mask = torch.cat([text_mask, text_mask.new_ones(b, gh * gw)], 1)
        angles = torch.cat([text_angles, image_angles], 1)
        for i, block in enumerate(self.layers):
            joined = block(joined, vec, angles, key_mask, text_len, i, self.recorder)
        img = joined[:, text_len:]
        shift, scale = self.final_mod(vec)
        out = self.final(modulate(F.layer_norm(img, img.shape[-1:]), shift, scale))
        return out.reshape(b, gh, gw, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# --- batching of variable-length captions ----------------------------------------------------------
def pad_ids(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id rows to the longest → (ids [B, T], mask [B, T] True on real tokens)."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def pad_contexts(contexts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i, D] hidden states → ([B, T, D] zero-padded, [B, T] mask)."""
    longest = max(c.shape[0] for c in contexts)
    out = contexts[0].new_zeros(len(contexts), longest, contexts[0].shape[-1])
    mask = torch.zeros(len(contexts), longest, dtype=torch.bool, device=contexts[0].device)
    for i, c in enumerate(contexts):
        out[i, :c.shape[0]] = c
        mask[i, :c.shape[0]] = True
    return out, mask


def strip_syntax(prompt: str) -> str:
    """The prompt's text without WebUI syntax (weights, brackets, BREAK), as the flow toy reads it."""
    text = re.sub(r":\s*[\d.]+\s*(?=[)\]])", " ", prompt.replace("BREAK", " "))
    return re.sub(r"\s+", " ", re.sub(r"[()\[\]]", " ", text)).strip()


def template_ids(tokenizer: ToyLLMTokenizer, prompt: str, max_text: int = MAX_TEXT) -> list[int]:
    """The template around the prompt's text (syntax stripped), the caption cut to fit ``max_text``
    tokens: the ids the model is trained on and sampled with."""
    before, after = (tokenizer.encode(part) for part in TEMPLATE.split("{}"))
    caption = tokenizer.encode(strip_syntax(prompt))[:max_text - len(before) - len(after)]
    return before + caption + after


# --- the host -------------------------------------------------------------------------------------------
@dataclass
class LLMFlowHost(FlowHost):
    """The flow toy's host (Euler on D = x − σ·v, flow noise scaling, even windows) with the
    template-wrapped causal text encoder: variable-length contexts, no pooled vector."""

    @property
    def model(self) -> LLMFlowTransformer:
        return self.unet  # type: ignore[return-value]

    @property
    def text_tokens(self) -> int:
        return self.model.config.max_text

    @property
    def special_ids(self) -> set[int]:
        return self.tokenizer.special_ids

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def context_ids(self, prompt: str) -> list[int]:
        return template_ids(self.tokenizer, prompt, self.text_tokens)

    def word_positions(self, words: Sequence[Word], prompt: str) -> list[list[int]]:
        """The product's LLM path: tokens spelled back to bytes, the template's text stepped over."""
        from ...flows.job import word_positions

        return word_positions(ToyLLMEngine(self), words, prompt)

    def encode(self, prompts: Sequence[str], vector: float = 0.0) -> list[RowCond]:
        rows = [self.context_ids(p) for p in prompts]
        ids, mask = pad_ids(rows, self.tokenizer.pad_token_id)
        with torch.no_grad():
            hidden = self.text_model(ids.to(self.device))
        return [RowCond(h[:len(r)]) for h, r in zip(hidden, rows)]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[RowCond]) -> torch.Tensor:
        context, mask = pad_contexts([c.context.to(x) for c in conds])
        return self.model(x, sigma.reshape(-1).expand(x.shape[0]).to(x), context, mask)


# --- weights --------------------------------------------------------------------------------------------
def build_llm_flow(config: LLMFlowConfig = LLMFlowConfig(), seed: int = 0) -> tuple[LLMFlowTransformer, CausalTextEncoder]:
    torch.manual_seed(seed)
    return LLMFlowTransformer(config), CausalTextEncoder(len(ToyLLMTokenizer()), config)


def save_llm_weights(path: Path, model: LLMFlowTransformer, text_model: nn.Module, meta: dict[str, Any]) -> None:
    """float16, the tokenizer's vocabulary in the metadata (it is part of the model)."""
    from safetensors.torch import save_file

    state = {f"flow.{k}": v for k, v in model.state_dict().items()}
    state.update({f"text.{k}": v for k, v in text_model.state_dict().items()})
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    meta = dict(meta, config=vars(model.config), vocab=ToyLLMTokenizer().vocab)
    tmp = Path(str(path) + ".tmp")
    save_file(state, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_llm_host(path: Path | str = LLM_WEIGHTS, shift: float = 1.0) -> LLMFlowHost:
    """The trained flow-llm toy as a host for :mod:`accdiffusion.lab.reference` (float32, eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"flow-llm toy weights not found at {path}; run "
                                "`python -m accdiffusion.lab.toy train --model flow-llm`")
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))  # type: ignore[attr-defined]
    config = LLMFlowConfig(**meta.get("config", {}))
    tokenizer = ToyLLMTokenizer(meta["vocab"]) if "vocab" in meta else ToyLLMTokenizer()
    model, text_model = build_llm_flow(config)
    state = load_file(str(path))
    model.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("flow.")})
    text_model.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("text.")})
    return LLMFlowHost(model.eval(), tokenizer, text_model=text_model.eval(), shift=shift, meta=meta)

