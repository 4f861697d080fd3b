"""Stand-ins of Forge Neo's new model families (Neo 2.26, the bundle ../shared/hosts/setup-forge-neo.sh
builds), written here, small and random, with the structure the backend relies on:

- Flux.2 Klein (backend/nn/flux.py in FLUX.2 mode, diffusion_engine/flux2.py): Flux's double- and
  single-stream blocks with one shared modulation (``global_modulation``, :437-443, :483-485),
  patch 1 on 128-channel latents (``patch_size``, :378, process_img :558-572), 4-axis position ids
  (image (0, row, col, 0), text (0, 0, 0, i) through ``txt_ids_dims``, :621-625), reference latents
  appended to the image tokens (``ref_latents or dynamic_args.ref_latents``, :583-611, index 1 on
  axis 0), no guidance input; its VAE packs 2x2 (``downscale_ratio`` 16, backend/patcher/vae.py:140);
  the engine's ``text_processing_engine_gemma`` is a Qwen3 engine with Klein's template (klein_engine.py:32).

- Z-Image / Lumina 2 (backend/nn/lumina.py): ``NextDiT`` (:215-419) — ``cap_embedder`` (RMSNorm +
  Linear, :317), ``context_refiner`` (caption-only blocks without modulation) and ``noise_refiner``
  (image-only blocks), then ``layers`` over the joined [caption; image] sequence (:378-384); the
  caption padded with ``cap_pad_token`` to a multiple of ``pad_tokens_multiple`` and the image with
  ``x_pad_token`` (:351-370); position ids: caption (i + 1, 0, 0), image (L_cap + 1, row, col)
  (:362-366); ``freqs_cis`` = EmbedND of the ids moved to [B, L, 1, D/2, 2, 2] (:372).
  ``JointTransformerBlock`` (:118-189) with ``attention`` = ``JointAttention`` (:51-97: one qkv,
  grouped key heads, ``q_norm`` / ``k_norm`` RMSNorm on [B, L, H, D], RoPE, keys repeated per
  query head); forward(x, timesteps, context, num_tokens, attention_mask, ...) with t = 1 − timesteps
  and output −x (:388-419).
- the engine (backend/diffusion_engine/zimage.py): ``text_processing_engine_gemma`` is a
  ``Qwen3TextProcessingEngine`` (backend/text_processing/qwen3_engine.py): the chat template
  "<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n" around every piece the emphasis
  parser splits the prompt into (:31-57), one chunk of every piece's tokens, no padding;
  ``get_learned_conditioning`` gives one [L, D] tensor per prompt (its length the prompt's own).

The tokenizer is a byte-level BPE trained here on a few sentences (``byte_level_tokenizer``) with
Qwen's special tokens: Neo's real Qwen tokenizers are not in CI (tests/test_neo_families.py runs
the word spans on them too when ``ACCDIFFUSION_NEO_DIR`` names a Neo checkout).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import dit_standins
from dit_standins import (Chunk, DiTEngineStandIn, FlowKModelStandIn, PredictionDiscreteFlowStandIn, rotary,
                          rotate)
from forge_standins import ForgeObjects, UnetPatcherStandIn

ZIMAGE_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "a red-haired astronaut riding a horse on the moon", "a user at a desk, photo of a café",
    "the quick brown fox jumps over the lazy dog", "a cat on a sofa next to a window at night",
    "portrait of a woman in a garden, soft light, detailed", "a castle on a hill under a blue sky",
    "user assistant system describe the image", "Kätzchen auf dem Sofa, Übergrößen 猫",
]


@functools.lru_cache(maxsize=1)
def byte_level_tokenizer():
    """A byte-level BPE with Qwen's chat specials (a fast tokenizer, as Neo's Qwen2TokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])


def parse_emphasis(line: str) -> list[tuple[str, float]]:
    """backend/text_processing/parsing.py for the prompts the tests use: "(text:w)" pieces and plain text."""
    import re

    out, pos = [], 0
    for m in re.finditer(r"\(([^():]+):([\d.]+)\)", line):
        if m.start() > pos:
            out.append((line[pos:m.start()], 1.0))
        out.append((m.group(1), float(m.group(2))))
        pos = m.end()
    if pos < len(line) or not out:
        out.append((line[pos:], 1.0))
    return out


class Qwen3EngineStandIn:
    """qwen3_engine.py:22-125: the template around every parsed piece, the pieces' tokens in one
    chunk, the embedding (a table here) times the piece's weight; one [L, width] tensor per line."""

    id_pad = 151643  # Neo's value; the stand-in's pad is its own <|endoftext|>
    llama_template = ZIMAGE_TEMPLATE

    def __init__(self, tokenizer, width=24, seed=11):
        self.tokenizer = tokenizer
        self.id_pad = tokenizer.pad_token_id
        torch.manual_seed(seed)
        self.table = nn.Embedding(len(tokenizer), width).requires_grad_(False)
        nn.init.normal_(self.table.weight)

    def tokenize(self, texts):
        return self.tokenizer([self.llama_template.format(t) for t in texts])["input_ids"]

    def tokenize_line(self, line):
        parsed = parse_emphasis(line)
        chunk = Chunk([])
        chunk.multipliers = []
        for tokens, (_, weight) in zip(self.tokenize([t for t, _ in parsed]), parsed):
            chunk.tokens += tokens
            chunk.multipliers += [weight] * len(tokens)
        return [chunk]  # Neo's LLM engines return the chunks alone, not (chunks, count)

    def __call__(self, texts):
        out = []
        for line in texts:
            chunk = self.tokenize_line(line)[0]
            out.append(self.table(torch.tensor(chunk.tokens)) * torch.tensor(chunk.multipliers)[:, None])
        return out


LUMINA_SYSTEM = ("You are an assistant designed to generate anime images with the highest degree of image-text "
                 "alignment based on danbooru tags. <Prompt Start>")  # Neo's neta_template_positive default


class GemmaEngineStandIn(Qwen3EngineStandIn):
    """gemma_engine.py:22-120 (Lumina 2 / Neta): no chat template in ``tokenize_line`` (the parsed
    pieces' tokens after one start token, :39-70); ``__call__`` first puts the system prompt
    before the line (``process_template``, :75-95: "<system>\n<line>", a line with its own
    ``<Prompt Start>`` as it is)."""

    llama_template = None
    system = LUMINA_SYSTEM

    def __init__(self, tokenizer, width=24, seed=11):
        super().__init__(tokenizer, width, seed)
        # Neo's id_start = 2, Gemma's <bos>; the stand-in vocabulary's own special here
        self.id_start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
            tokenizer.convert_tokens_to_ids("<|im_start|>")

    def tokenize(self, texts):
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def tokenize_line(self, line):
        chunk = super().tokenize_line(line)[0]
        chunk.tokens = [self.id_start] + chunk.tokens
        chunk.multipliers = [1.0] + chunk.multipliers
        return [chunk]

    def process_template(self, text, negative):
        return text if "<Prompt Start>" in text else "\n".join([self.system, text])

    def __call__(self, texts):
        return super().__call__([self.process_template(line, False) for line in texts])


# --- NextDiT ----------------------------------------------------------------------------------------
class JointAttention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.n_local_heads, self.n_local_kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)

    def forward(self, x, x_mask, freqs_cis, transformer_options={}):
        b, n, _ = x.shape
        d = self.head_dim
        q, k, v = self.qkv(x).split([self.n_local_heads * d, self.n_local_kv_heads * d, self.n_local_kv_heads * d], -1)
        q = self.q_norm(q.view(b, n, self.n_local_heads, d))
        k = self.k_norm(k.view(b, n, self.n_local_kv_heads, d))
        v = v.view(b, n, self.n_local_kv_heads, d)
        q, k = rotate(q, freqs_cis), rotate(k, freqs_cis)  # freqs_cis [B, L, 1, D/2, 2, 2]
        rep = self.n_local_heads // self.n_local_kv_heads
        k = k.unsqueeze(3).repeat(1, 1, 1, rep, 1).flatten(2, 3)
        v = v.unsqueeze(3).repeat(1, 1, 1, rep, 1).flatten(2, 3)
        return self.out(dit_standins.joint_attention(q.movedim(1, 2), k.movedim(1, 2), v.movedim(1, 2)))


class JointTransformerBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, modulation=True, ffn_hidden=None):
        super().__init__()
        self.attention = JointAttention(dim, heads, kv_heads)
        hidden = ffn_hidden or 2 * dim  # the bench sets the width whose FLOPs match Neo's gated FFN
        self.feed_forward = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.attention_norm1, self.attention_norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.ffn_norm1, self.ffn_norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 4 * dim))

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, transformer_options={}):
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
            h = self.attention(self.attention_norm1(x) * (1 + scale_msa[:, None]), x_mask, freqs_cis)
            x = x + gate_msa[:, None].tanh() * self.attention_norm2(h)
            h = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
            return x + gate_mlp[:, None].tanh() * self.ffn_norm2(h)
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), x_mask, freqs_cis))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class NextDiTStandIn(nn.Module):
    """NextDiT with Z-Image's options (pad tokens, t = 1 − timesteps, output −x), tiny; grouped
    attention (4 query heads on 2 key heads) so the capture's head repeat is exercised."""

    def __init__(self, channels=16, cap_dim=24, dim=32, heads=4, kv_heads=2, layers=4, pad_tokens_multiple=8,
                 axes=(2, 2, 4), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_size, self.axes, self.pad_tokens_multiple = 2, axes, pad_tokens_multiple
        self.x_embedder = nn.Linear(channels * 4, dim)
        self.cap_embedder = nn.Sequential(nn.RMSNorm(cap_dim), nn.Linear(cap_dim, dim))
        self.t_embedder = nn.Linear(32, dim)
        self.noise_refiner = nn.ModuleList([JointTransformerBlock(dim, heads, kv_heads)])
        self.context_refiner = nn.ModuleList([JointTransformerBlock(dim, heads, kv_heads, modulation=False)])
        self.layers = nn.ModuleList([JointTransformerBlock(dim, heads, kv_heads) for _ in range(layers)])
        self.x_pad_token = nn.Parameter(torch.randn(1, dim))
        self.cap_pad_token = nn.Parameter(torch.randn(1, dim))
        self.final_layer = nn.Linear(dim, channels * 4)
        self.calls: list[dict] = []
        self.tap = None

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        x = nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="circular")  # pad_to_patch_size
        self.calls.append({"shape": tuple(x.shape), "context": context.detach().clone(),
                           "t": timesteps.detach().clone()})
        if self.tap is not None:
            return self.tap(x[..., :h, :w], timesteps, context)
        t = self.t_embedder(dit_standins.sinusoid(1.0 - timesteps, 32, factor=1.0))
        cap = self.cap_embedder(context)
        m = self.pad_tokens_multiple
        cap = torch.cat([cap, self.cap_pad_token[None].repeat(b, -cap.shape[1] % m, 1)], 1)
        gh, gw = x.shape[-2] // 2, x.shape[-1] // 2
        img = self.x_embedder(x.reshape(b, c, gh, 2, gw, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, 4 * c))
        cap_ids = torch.zeros(b, cap.shape[1], 3)
        cap_ids[..., 0] = torch.arange(cap.shape[1], dtype=torch.float32) + 1.0
        img_ids = torch.zeros(b, gh * gw, 3)
        img_ids[..., 0] = cap.shape[1] + 1
        img_ids[..., 1] = torch.arange(gh, dtype=torch.float32)[:, None].repeat(1, gw).flatten()
        img_ids[..., 2] = torch.arange(gw, dtype=torch.float32)[None, :].repeat(gh, 1).flatten()
        extra = -img.shape[1] % m
        img = torch.cat([img, self.x_pad_token[None].repeat(b, extra, 1)], 1)
        img_ids = nn.functional.pad(img_ids, (0, 0, 0, extra))
        freqs = rotary(torch.cat([cap_ids, img_ids], 1), self.axes).movedim(1, 2)
        for layer in self.context_refiner:
            cap = layer(cap, attention_mask, freqs[:, :cap.shape[1]])
        for layer in self.noise_refiner:
            img = layer(img, None, freqs[:, cap.shape[1]:], t)
        joined = torch.cat([cap, img], 1)
        for layer in self.layers:
            joined = layer(joined, None, freqs, t)
        out = self.final_layer(joined[:, cap.shape[1]:cap.shape[1] + gh * gw])
        out = out.reshape(b, gh, gw, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * 2, gw * 2)
        return -out[..., :h, :w]


class ZImageEngineStandIn(DiTEngineStandIn):
    """backend/diffusion_engine/zimage.py: NextDiT on a discrete-flow predictor (shift 3), the Qwen3
    engine as ``text_processing_engine_gemma``; conditioning = the engine's [L, D] tensor.
    ``engine=GemmaEngineStandIn``: Lumina 2 (diffusion_engine/lumina.py: the same class, the Gemma
    engine under the same name)."""

    def __init__(self, tokenizer=None, engine=None):
        self.family, self.is_sd3 = "zimage", False
        self.text_processing_engine_gemma = (engine or Qwen3EngineStandIn)(tokenizer or byte_level_tokenizer())
        self.transformer = NextDiTStandIn().requires_grad_(False)
        self.kmodel = FlowKModelStandIn(self.transformer, PredictionDiscreteFlowStandIn(shift=3.0))
        self.forge_objects_after_applying_lora = ForgeObjects(UnetPatcherStandIn(self.kmodel))
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()
        self.encoded: list[str] = []

    def encode(self, prompt, is_negative=False, distilled_cfg_scale=None):
        self.encoded.append(prompt)
        with torch.no_grad():
            return self.text_processing_engine_gemma([prompt])[0]


# --- Flux.2 Klein --------------------------------------------------------------------------------------
KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class ReferenceHolder:
    """backend.args.dynamic_args: its ``ref_latents`` list (args.py:171), which Neo's Flux.2 forward
    appends to the image tokens of every call (flux.py:583-611)."""

    def __init__(self):
        self.ref_latents: list = []


class KleinStandIn(dit_standins.FluxStandIn):
    guidance_embed = False
    global_modulation = True
    patch_size = 1

    def __init__(self, channels=128, context_dim=24, dim=32, heads=2, seed=0):
        super().__init__(channels=channels, context_dim=context_dim, dim=dim, heads=heads, depth=1, single=2,
                         axes=(4, 4, 4, 4), seed=seed)
        self.img_in, self.final_layer = nn.Linear(channels, dim), nn.Linear(dim, channels)
        self.references = ReferenceHolder()

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, **kwargs):
        b, c, h, w = x.shape
        img = x.flatten(2).transpose(1, 2)
        ids = torch.zeros(h, w, 4)
        ids[..., 1] += torch.arange(h, dtype=torch.float32)[:, None]
        ids[..., 2] += torch.arange(w, dtype=torch.float32)[None, :]
        img_ids = ids.reshape(1, h * w, 4).expand(b, -1, -1)
        references = ref_latents or self.references.ref_latents
        for ref in references:
            ref_ids = torch.zeros(ref.shape[-2], ref.shape[-1], 4)
            ref_ids[..., 0] = 1.0
            img = torch.cat([img, ref.to(x).flatten(2).transpose(1, 2).expand(b, -1, -1)], 1)
            img_ids = torch.cat([img_ids, ref_ids.reshape(1, -1, 4).expand(b, -1, -1)], 1)
        txt_ids = torch.zeros(b, context.shape[1], 4)
        txt_ids[..., 3] = torch.arange(context.shape[1], dtype=torch.float32)
        self.calls.append({"shape": tuple(x.shape), "context": context.detach().clone(), "tokens": img.shape[1],
                           "t": timestep.detach().clone()})
        pe = rotary(torch.cat([txt_ids, img_ids], 1), self.axes)
        vec = self.time_in(dit_standins.sinusoid(timestep, 32))
        img, txt = self.img_in(img), self.txt_in(context)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        joined = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            joined = block(joined, vec=vec, pe=pe)
        out = self.final_layer(joined[:, txt.shape[1]:txt.shape[1] + h * w])
        return out.transpose(1, 2).reshape(b, c, h, w)


class KleinEngineStandIn(DiTEngineStandIn):
    """diffusion_engine/flux2.py: Klein on a Flux predictor, the Qwen3 engine with Klein's template;
    its VAE's downscale ratio 16."""

    def __init__(self, tokenizer=None):
        import types

        self.family, self.is_sd3 = "klein", False
        engine = Qwen3EngineStandIn(tokenizer or byte_level_tokenizer())
        engine.llama_template = KLEIN_TEMPLATE
        self.text_processing_engine_gemma = engine
        self.transformer = KleinStandIn().requires_grad_(False)
        self.kmodel = FlowKModelStandIn(self.transformer, dit_standins.PredictionFluxStandIn())
        vae = types.SimpleNamespace(downscale_ratio=16)
        self.forge_objects_after_applying_lora = ForgeObjects(UnetPatcherStandIn(self.kmodel), vae)
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()
        self.encoded: list[str] = []

    def encode(self, prompt, is_negative=False, distilled_cfg_scale=None):
        self.encoded.append(prompt)
        with torch.no_grad():
            return self.text_processing_engine_gemma([prompt])[0]


class KleinWebUIStandIn(dit_standins.DiTWebUIStandIn):
    """Decode / encode at 16 pixels per latent pixel, 128 channels."""

    def decode(self, model, latent):
        return torch.tanh(torch.nn.functional.interpolate(latent[:, :3].float(), scale_factor=16, mode="nearest"))

    def encode(self, model, pixels, seed=None):
        x = torch.atanh(torch.nn.functional.avg_pool2d(pixels.float() * 2 - 1, 16).clamp(-0.95, 0.95))
        return torch.cat([x] * 43, 1)[:, :128]


class KleinTxt2ImgStandIn(dit_standins.DiTTxt2ImgStandIn):
    def __init__(self, model, webui, prompts, **kwargs):
        kwargs.setdefault("cfg_scale", 1.0)
        super().__init__(model, webui, prompts, **kwargs)
        self.rng = dit_standins.ImageRNGStandIn((128, self.height // 16, self.width // 16), self.seeds)
