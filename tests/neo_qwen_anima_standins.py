"""Stand-ins of Forge Neo's Qwen-Image and Anima families (Neo 2.26, the bundle
../shared/hosts/setup-forge-neo.sh builds), written here, small and random, with the structure the
backend relies on. Nothing here is Neo's code: the classes mirror the names, call signatures and
tensor layouts of Neo's, cited by file:line.

- Qwen-Image (backend/nn/qwen.py): ``QwenImageTransformer2DModel`` (:335-483) takes the latent with
  a time axis, [B, C, 1, H, W] (``process_img`` reads five dimensions, :371-372), 2×2 patches, image
  ids centred on the grid (:385-388), text ids from ``txt_start`` on (:426-427), the rotary embedding
  of [text; image] as [B, L, 1, D/2, 2, 2] (:428-429); ``txt_norm`` (RMSNorm) and ``txt_in`` on the
  context (:433-434); ``transformer_blocks`` of ``QwenImageTransformerBlock`` (:246-318) called with
  keywords (hidden_states=, encoder_hidden_states=, encoder_hidden_states_mask=, temb=,
  image_rotary_emb=, :457-463) returning (text, image); its ``attn`` = ``Attention`` (:169-244):
  per-stream projections, ``norm_q`` / ``norm_k`` (image) and ``norm_added_q`` / ``norm_added_k``
  (text) on [B, L, H, D], one softmax over [text; image] (text first, :221-234).
- its engine (backend/diffusion_engine/qwen.py): ``text_processing_engine_qwen`` = a
  ``QwenTextProcessingEngine`` (backend/text_processing/qwen_engine.py): the system template
  (:31) around every piece the emphasis parser splits the prompt into (:34-36, :38-76), one chunk;
  the encoder's output cut by ``strip_template`` (:109-127): up to the second <|im_start|>, and past
  "user\\n" after it when the output is wider than that position + 3 (the rule compares the
  output's *width*, out.shape[1], :122). The stand-in's encoder is 128 wide, past the template's
  end as Qwen2.5-VL's 3584 is; its ids of <|im_start|>, "user" and "\\n" are its tokenizer's own
  (Neo's 151644, 872 and 198).
- Anima (backend/nn/anima.py): ``Anima`` (:370-510) takes [B, C, 1, H, W] too (``PatchEmbed``
  asserts five dimensions, :212-217), a padding-mask channel concatenated (:438-446),
  ``blocks`` of ``Block`` (:248-368): AdaLN-modulated self-attention, cross-attention to the
  context, MLP; ``self_attn`` / ``cross_attn`` = ``SelfCrossAttention`` (:99-155): q/k/v
  projections, ``q_norm`` / ``k_norm`` (RMSNorm over the head dim) on [B, …, H, D], RoPE on the
  self-attention only (:134-135), the attention on [B, H, L, D] (:139-146). The context is
  [B, 1, 512, D]: one [1, 512, D] per prompt (anima_engine.py:110-124), the keys keep that axis.
- its engine (backend/diffusion_engine/anima.py): ``text_processing_engine_anima`` = an
  ``AnimaTextProcessingEngine`` (backend/text_processing/anima_engine.py): ``tokenize_line``
  (:38-76) gives chunks with ``qwen_tokens`` (the prompt's Qwen3 ids, no template, weight 1) and
  ``t5_tokens`` (its T5 ids with the emphasis weights, EOS 1); the Qwen3 states go through the LLM
  adapter with the T5 ids as queries (anima.py:633-663): one output token per T5 token, weighted,
  padded to 512 (anima_engine.py:110-124).

The Qwen side tokenizes with the byte-level BPE of ``neo_standins.byte_level_tokenizer`` (Qwen's
special tokens), the T5 side with the tiny T5 tokenizer the Flux stand-ins load
(``dit_standins.load_tokenizers()[1]``). Both models record their calls (``calls``: input shape,
context, t) and assert that the latent has the time axis.
"""

from __future__ import annotations

import torch
from torch import nn

import dit_standins
from a1111_standins import ImageRNGStandIn
from dit_standins import (Chunk, DiTEngineStandIn, DiTTxt2ImgStandIn, DiTWebUIStandIn, FlowKModelStandIn,
                          PredictionDiscreteFlowStandIn, rotary, rotate)
from forge_standins import ForgeObjects, UnetPatcherStandIn
from neo_standins import byte_level_tokenizer, parse_emphasis

# qwen_engine.py:31, the text-to-image template (the edit template, :32, is not served)
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")
ANIMA_CONTEXT = 512  # anima_engine.py:120-121: the adapter's output padded to 512 tokens


def attention_function(q, k, v, heads):
    """backend.attention.attention_function without skip_reshape: [B, L, H·D] in and out."""
    b, n, inner = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, inner // heads).transpose(1, 2)
    return dit_standins.joint_attention(split(q), split(k), split(v))


def attention_op(q, k, v):
    """attention_function with skip_reshape: [B, H, L, D] in, [B, L, H·D] out (anima.py:139-146)."""
    return dit_standins.joint_attention(q, k, v)


class PredictionDiscreteFlow5DStandIn(PredictionDiscreteFlowStandIn):
    """k_prediction.py:73-78: σ viewed to the output's rank (the Flux stand-in's is 4-D only)."""

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))


# --- Qwen-Image ---------------------------------------------------------------------------------------
class QwenAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.dim_head = heads, dim // heads
        self.norm_q, self.norm_k = nn.RMSNorm(self.dim_head, eps=1e-6), nn.RMSNorm(self.dim_head, eps=1e-6)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(self.dim_head, eps=1e-6), nn.RMSNorm(self.dim_head, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                attention_mask=None, image_rotary_emb=None):
        heads = lambda t: t.unflatten(-1, (self.heads, self.dim_head))  # [B, L, H, D]
        text = encoder_hidden_states.shape[1]
        q = torch.cat([self.norm_added_q(heads(self.add_q_proj(encoder_hidden_states))),
                       self.norm_q(heads(self.to_q(hidden_states)))], 1)
        k = torch.cat([self.norm_added_k(heads(self.add_k_proj(encoder_hidden_states))),
                       self.norm_k(heads(self.to_k(hidden_states)))], 1)
        v = torch.cat([heads(self.add_v_proj(encoder_hidden_states)), heads(self.to_v(hidden_states))], 1)
        q, k = rotate(q, image_rotary_emb), rotate(k, image_rotary_emb)  # [B, L, 1, D/2, 2, 2] on [B, L, H, D]
        out = attention_function(q.flatten(2), k.flatten(2), v.flatten(2), self.heads)
        return self.to_out[0](out[:, text:]), self.to_add_out(out[:, :text])


class QwenImageTransformerBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=2):
        super().__init__()
        hidden = int(mlp_ratio * dim)  # Neo's FeedForward: 4 (the bench counts at that width)
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1, self.img_norm2, self.txt_norm1, self.txt_norm2 = (
            nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in range(4))
        self.img_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.attn = QwenAttention(dim, heads)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None):
        def mod(x, params):
            shift, scale, gate = params.chunk(3, -1)
            return x * (1 + scale[:, None]) + shift[:, None], gate[:, None]

        img1, img2 = self.img_mod(temb).chunk(2, -1)
        txt1, txt2 = self.txt_mod(temb).chunk(2, -1)
        img_in, img_gate = mod(self.img_norm1(hidden_states), img1)
        txt_in, txt_gate = mod(self.txt_norm1(encoder_hidden_states), txt1)
        img_attn, txt_attn = self.attn(hidden_states=img_in, encoder_hidden_states=txt_in,
                                       encoder_hidden_states_mask=encoder_hidden_states_mask,
                                       image_rotary_emb=image_rotary_emb)
        hidden_states = hidden_states + img_gate * img_attn
        encoder_hidden_states = encoder_hidden_states + txt_gate * txt_attn
        img_in, img_gate = mod(self.img_norm2(hidden_states), img2)
        txt_in, txt_gate = mod(self.txt_norm2(encoder_hidden_states), txt2)
        hidden_states = hidden_states + img_gate * self.img_mlp(img_in)
        encoder_hidden_states = encoder_hidden_states + txt_gate * self.txt_mlp(txt_in)
        return encoder_hidden_states, hidden_states


class QwenImageStandIn(nn.Module):
    """QwenImageTransformer2DModel, tiny: 4 double-stream blocks, 2 heads of 16."""

    def __init__(self, channels=16, context_dim=128, dim=32, heads=2, layers=4, axes=(4, 6, 6), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_size, self.axes, self.out_channels = 2, axes, channels
        self.time_text_embed = nn.Linear(32, dim)
        self.txt_norm = nn.RMSNorm(context_dim, eps=1e-6)
        self.img_in, self.txt_in = nn.Linear(channels * 4, dim), nn.Linear(context_dim, dim)
        self.transformer_blocks = nn.ModuleList([QwenImageTransformerBlock(dim, heads) for _ in range(layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, channels * 4)
        self.calls: list[dict] = []

    def forward(self, x, timesteps, context, attention_mask=None, guidance=None, ref_latents=None,
                transformer_options={}, control=None, **kwargs):
        assert x.ndim == 5 and x.shape[2] == 1, f"Qwen-Image takes [B, C, 1, H, W], got {tuple(x.shape)}"
        self.calls.append({"shape": tuple(x.shape), "context": context.detach().clone(),
                           "t": timesteps.detach().clone()})
        b, c, _, h, w = x.shape
        padded = nn.functional.pad(x[:, :, 0], (0, w % 2, 0, h % 2), mode="circular")  # pad_to_patch_size
        gh, gw = padded.shape[-2] // 2, padded.shape[-1] // 2
        img = padded.reshape(b, c, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * 4)
        img_ids = torch.zeros(gh, gw, 3)  # qwen.py:385-388: rows and columns centred on the grid
        img_ids[..., 1] = torch.arange(gh, dtype=torch.float32)[:, None] - gh // 2
        img_ids[..., 2] = torch.arange(gw, dtype=torch.float32)[None, :] - gw // 2
        start = max(gw // 2, gh // 2)  # qwen.py:426, txt_start
        txt_ids = torch.arange(start, start + context.shape[1], dtype=torch.float32)[:, None].repeat(1, 3)
        ids = torch.cat([txt_ids, img_ids.reshape(-1, 3)])[None].expand(b, -1, -1)
        rope = rotary(ids, self.axes).squeeze(1).unsqueeze(2)  # [B, L, 1, D/2, 2, 2]
        hidden, text = self.img_in(img), self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(dit_standins.sinusoid(timesteps, 32, factor=1.0))
        for block in self.transformer_blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=attention_mask,
                                 temb=temb, image_rotary_emb=rope)
        out = self.proj_out(self.norm_out(hidden))
        out = out.reshape(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, gh * 2, gw * 2)
        return out[..., :h, :w]


class QwenTextEncoderStandIn(nn.Module):
    """Qwen2.5-VL's place in the engine: ``get_input_embeddings`` (its width is the one
    strip_template compares) and a causal mix, so a token's state depends on what precedes it."""

    def __init__(self, vocab, width=128, seed=13):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, embeds):
        causal = embeds.cumsum(1) / torch.arange(1, embeds.shape[1] + 1, dtype=embeds.dtype)[None, :, None]
        return embeds + 0.5 * self.mix(causal)


class QwenTextEngineStandIn:
    """qwen_engine.py:18-127, text-to-image only: the template around every parsed piece, the
    pieces' tokens in one chunk with their weights, the encoder's output cut by strip_template;
    one [L, width] tensor per line (the engine returns one per chunk, and it makes one chunk)."""

    def __init__(self, tokenizer=None, width=128):
        self.tokenizer = tokenizer or byte_level_tokenizer()
        self.llama_template = QWEN_TEMPLATE
        self.min_length = 1
        self.id_pad = self.tokenizer.pad_token_id
        self.id_template = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        # the two ids strip_template steps over after the second <|im_start|> ("user", "\n")
        self.id_user, self.id_newline = self.tokenizer(["user\n"])["input_ids"][0]
        self.text_encoder = QwenTextEncoderStandIn(len(self.tokenizer), width).requires_grad_(False)

    def tokenize(self, texts):
        return self.tokenizer([self.llama_template.format(t) for t in texts])["input_ids"]

    def tokenize_line(self, line):
        parsed = parse_emphasis(line)
        chunk = Chunk([])
        chunk.multipliers = []
        for tokens, (_, weight) in zip(self.tokenize([t for t, _ in parsed]), parsed):
            chunk.tokens += tokens
            chunk.multipliers += [weight] * len(tokens)
        missing = self.min_length - len(chunk.tokens)
        chunk.tokens += [self.id_pad] * max(0, missing)
        chunk.multipliers += [1.0] * max(0, missing)
        return [chunk]  # the chunks alone, as Neo's LLM engines return them

    def strip_template(self, out, tokens):
        """The rule of qwen_engine.py:109-127 (out: [L, width]; ``tokens`` may hold non-ids)."""
        starts = [i for i, t in enumerate(tokens) if isinstance(t, int) and t == self.id_template][:2]
        end = starts[-1] if starts else 0
        if out.shape[1] > end + 3 and tokens[end + 1] == self.id_user and tokens[end + 2] == self.id_newline:
            end += 3
        return out[end:]

    def __call__(self, texts):
        out = []
        for line in texts:
            chunk = self.tokenize_line(line)[0]
            embeds = self.text_encoder.get_input_embeddings()(torch.tensor([chunk.tokens]))
            embeds = embeds * torch.tensor(chunk.multipliers)[None, :, None]  # emphasis on the embeddings
            out.append(self.strip_template(self.text_encoder(embeds)[0], chunk.tokens))
        return out


class QwenImageEngineStandIn(DiTEngineStandIn):
    """backend/diffusion_engine/qwen.py: the transformer on a discrete-flow predictor, the Qwen
    engine as ``text_processing_engine_qwen``, a video VAE (``is_wan``); conditioning = the
    engine's stripped [L, D] tensor."""

    def __init__(self, tokenizer=None):
        self.family, self.is_sd3, self.is_wan = "qwen", False, True
        self.text_processing_engine_qwen = QwenTextEngineStandIn(tokenizer)
        self.transformer = QwenImageStandIn().requires_grad_(False)
        self.kmodel = FlowKModelStandIn(self.transformer, PredictionDiscreteFlow5DStandIn(shift=3.0))
        self.forge_objects_after_applying_lora = ForgeObjects(UnetPatcherStandIn(self.kmodel))
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()
        self.encoded: list[str] = []

    def encode(self, prompt, is_negative=False, distilled_cfg_scale=None):
        self.encoded.append(prompt)
        with torch.no_grad():
            return self.text_processing_engine_qwen([prompt])[0]


# --- Anima --------------------------------------------------------------------------------------------
class SelfCrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, n_heads=2, head_dim=16):
        super().__init__()
        self.is_SelfAttn = context_dim is None
        self.n_heads, self.head_dim = n_heads, head_dim
        inner, context_dim = n_heads * head_dim, context_dim or query_dim
        self.q_proj, self.q_norm = nn.Linear(query_dim, inner, bias=False), nn.RMSNorm(head_dim, eps=1e-6)
        self.k_proj, self.k_norm = nn.Linear(context_dim, inner, bias=False), nn.RMSNorm(head_dim, eps=1e-6)
        self.v_proj, self.v_norm = nn.Linear(context_dim, inner, bias=False), nn.Identity()
        self.output_proj = nn.Linear(inner, query_dim, bias=False)

    def compute_qkv(self, x, context=None, rope_emb=None):
        source = x if context is None else context
        heads = lambda t: t.unflatten(-1, (self.n_heads, self.head_dim))  # [B, …, H, D]
        q = self.q_norm(heads(self.q_proj(x)))
        k = self.k_norm(heads(self.k_proj(source)))
        v = self.v_norm(heads(self.v_proj(source)))
        if self.is_SelfAttn and rope_emb is not None:  # Neo rotates split-half pairs; pairs of neighbours here
            q, k = rotate(q, rope_emb), rotate(k, rope_emb)
        return q, k, v

    def forward(self, x, context=None, rope_emb=None, transformer_options={}):
        q, k, v = self.compute_qkv(x, context, rope_emb)
        b = q.shape[0]
        to_heads_first = lambda t: t.movedim(-2, 1).reshape(b, self.n_heads, -1, self.head_dim)  # [B, H, L, D]
        return self.output_proj(attention_op(to_heads_first(q), to_heads_first(k), to_heads_first(v)))


class AnimaBlock(nn.Module):
    def __init__(self, dim, context_dim, heads, lora_dim=16, mlp_ratio=2):
        super().__init__()
        hidden = int(mlp_ratio * dim)  # Neo's GPT2FeedForward: 4 (the bench counts at that width)
        self.layer_norm_self_attn, self.layer_norm_cross_attn, self.layer_norm_mlp = (
            nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in range(3))
        self.self_attn = SelfCrossAttention(dim, None, heads, dim // heads)
        self.cross_attn = SelfCrossAttention(dim, context_dim, heads, dim // heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))
        make = lambda: nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, 3 * dim, bias=False))
        self.adaln_modulation_self_attn, self.adaln_modulation_cross_attn, self.adaln_modulation_mlp = make(), make(), make()

    def forward(self, x_B_T_H_W_D, emb_B_T_D, crossattn_emb, rope_emb_L_1_1_D=None, adaln_lora_B_T_3D=None,
                extra_per_block_pos_emb=None, transformer_options={}):
        x = x_B_T_H_W_D
        b, t, h, w, d = x.shape
        flat = lambda y: y.reshape(b, t * h * w, d)
        back = lambda y: y.reshape(b, t, h, w, d)

        def mod(modulation):
            shift, scale, gate = (modulation(emb_B_T_D) + adaln_lora_B_T_3D).chunk(3, -1)
            return (s[:, :, None, None] for s in (shift, scale, gate))

        shift, scale, gate = mod(self.adaln_modulation_self_attn)
        x = x + gate * back(self.self_attn(flat(self.layer_norm_self_attn(x) * (1 + scale) + shift), None,
                                           rope_emb=rope_emb_L_1_1_D))
        shift, scale, gate = mod(self.adaln_modulation_cross_attn)
        x = x + gate * back(self.cross_attn(flat(self.layer_norm_cross_attn(x) * (1 + scale) + shift), crossattn_emb,
                                            rope_emb=rope_emb_L_1_1_D))
        shift, scale, gate = mod(self.adaln_modulation_mlp)
        return x + gate * self.mlp(self.layer_norm_mlp(x) * (1 + scale) + shift)


class AnimaStandIn(nn.Module):
    """Anima (Cosmos-Predict2 blocks), tiny: 4 blocks, 2 heads of 16, patch 2×2 (one frame)."""

    def __init__(self, channels=16, context_dim=32, dim=32, heads=2, layers=4, axes=(4, 6, 6), lora_dim=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch_spatial, self.patch_temporal, self.axes, self.out_channels = 2, 1, axes, channels
        self.x_embedder = nn.Linear((channels + 1) * 4, dim, bias=False)  # + the padding-mask channel
        self.t_embedder = nn.ModuleList([nn.Linear(32, dim, bias=False), nn.Linear(dim, 3 * dim, bias=False)])
        self.t_embedding_norm = nn.RMSNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList([AnimaBlock(dim, context_dim, heads, lora_dim) for _ in range(layers)])
        self.final_layer = nn.Linear(dim, channels * 4, bias=False)
        self.calls: list[dict] = []

    def forward(self, x, timesteps, context, padding_mask=None, **kwargs):
        assert x.ndim == 5 and x.shape[2] == 1, f"Anima takes [B, C, 1, H, W], got {tuple(x.shape)}"
        assert context.ndim == 4 and context.shape[1:3] == (1, ANIMA_CONTEXT), tuple(context.shape)
        self.calls.append({"shape": tuple(x.shape), "context": context.detach().clone(),
                           "t": timesteps.detach().clone()})
        b, c, _, h, w = x.shape
        padded = nn.functional.pad(x[:, :, 0], (0, w % 2, 0, h % 2), mode="circular")
        padded = torch.cat([padded, torch.zeros_like(padded[:, :1])], 1)  # the padding mask, zeros
        gh, gw = padded.shape[-2] // 2, padded.shape[-1] // 2
        patches = padded.reshape(b, c + 1, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 1, gh, gw, -1)
        x5 = self.x_embedder(patches)  # [B, T, H, W, D]
        ids = torch.zeros(gh, gw, 3)
        ids[..., 1] = torch.arange(gh, dtype=torch.float32)[:, None]
        ids[..., 2] = torch.arange(gw, dtype=torch.float32)[None, :]
        rope = rotary(ids.reshape(1, -1, 3), self.axes).movedim(1, 2)  # [1, THW, 1, D/2, 2, 2]
        emb = self.t_embedder[0](dit_standins.sinusoid(timesteps, 32, factor=1.0))[:, None]  # [B, T=1, D]
        lora = self.t_embedder[1](nn.functional.silu(emb))
        emb = self.t_embedding_norm(emb)
        for block in self.blocks:
            x5 = block(x5, emb, context, rope_emb_L_1_1_D=rope, adaln_lora_B_T_3D=lora)
        out = self.final_layer(x5)[:, 0]  # [B, gh, gw, C·4]
        out = out.reshape(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, gh * 2, gw * 2)
        return out[..., :h, :w]


class LLMAdapterStandIn(nn.Module):
    """anima.py:633-663 in one block: the T5 ids embedded (32128 rows) as queries, cross-attention to
    the Qwen3 states, out_proj, norm — one output token per T5 token."""

    def __init__(self, source_dim, dim, seed=17):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(32128, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(source_dim, dim), nn.Linear(source_dim, dim)
        self.out_proj, self.norm = nn.Linear(dim, dim), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, source_hidden_states, target_input_ids):
        x = self.embed(target_input_ids)
        scores = self.q(x) @ self.k(source_hidden_states).transpose(-1, -2) * x.shape[-1] ** -0.5
        x = x + torch.softmax(scores, -1) @ self.v(source_hidden_states)
        return self.norm(self.out_proj(x))


class AnimaTextEncoderStandIn(nn.Module):
    """Qwen3-0.6B's place in the engine, with the LLM adapter (``preprocess_text_embeds``)."""

    def __init__(self, vocab, width=24, dim=32, seed=19):
        super().__init__()
        self.qwen = QwenTextEncoderStandIn(vocab, width, seed)
        self.llm_adapter = LLMAdapterStandIn(width, dim)

    def get_input_embeddings(self):
        return self.qwen.get_input_embeddings()

    def forward(self, embeds):
        return self.qwen(embeds)

    def preprocess_text_embeds(self, cross_attn, t5xxl_ids):
        return self.llm_adapter(cross_attn, t5xxl_ids)


class AnimaChunk:
    """anima_engine.py:14-19 PromptChunk."""

    def __init__(self):
        self.qwen_tokens, self.qwen_multipliers, self.t5_tokens, self.t5_multipliers = [], [], [], []


class AnimaTextEngineStandIn:
    """anima_engine.py:22-124: ``tokenize`` gives (Qwen ids, T5 ids) without special tokens; one
    chunk: every piece's Qwen ids at weight 1, its T5 ids at the piece's weight, T5 EOS (1); the
    Qwen3 states through the adapter with the T5 ids, weighted per T5 token, padded to 512."""

    id_end = 1

    def __init__(self, qwen_tokenizer=None, t5_tokenizer=None):
        self.qwen_tokenizer = qwen_tokenizer or byte_level_tokenizer()
        self.t5_tokenizer = t5_tokenizer or dit_standins.load_tokenizers()[1]
        self.id_pad = self.qwen_tokenizer.pad_token_id  # Neo: 151643
        self.text_encoder = AnimaTextEncoderStandIn(len(self.qwen_tokenizer)).requires_grad_(False)

    def tokenize(self, texts):
        return (self.qwen_tokenizer(texts, add_special_tokens=False)["input_ids"],
                self.t5_tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"])

    def tokenize_line(self, line):
        parsed = parse_emphasis(line)
        qwen, t5 = self.tokenize([text for text, _ in parsed])
        chunk = AnimaChunk()
        for tokens in qwen:
            chunk.qwen_tokens += tokens
            chunk.qwen_multipliers += [1.0] * len(tokens)
        for tokens, (_, weight) in zip(t5, parsed):
            chunk.t5_tokens += tokens
            chunk.t5_multipliers += [weight] * len(tokens)
        if not chunk.qwen_tokens:
            chunk.qwen_tokens, chunk.qwen_multipliers = [self.id_pad], [1.0]
        chunk.t5_tokens.append(self.id_end)
        chunk.t5_multipliers.append(1.0)
        return [chunk]

    def __call__(self, texts):
        out = []
        for line in texts:
            chunk, = self.tokenize_line(line)
            states = self.text_encoder(self.text_encoder.get_input_embeddings()(torch.tensor([chunk.qwen_tokens])))
            cross = self.text_encoder.preprocess_text_embeds(states, torch.tensor([chunk.t5_tokens]))
            cross = cross * torch.tensor(chunk.t5_multipliers)[None, :, None]
            out.append(nn.functional.pad(cross, (0, 0, 0, max(0, ANIMA_CONTEXT - cross.shape[1]))))  # [1, 512, D]
        return out


class AnimaEngineStandIn(DiTEngineStandIn):
    """backend/diffusion_engine/anima.py: the transformer on a discrete-flow predictor, the Anima
    engine as ``text_processing_engine_anima``, a video VAE; conditioning = [1, 512, D] per prompt."""

    def __init__(self, qwen_tokenizer=None, t5_tokenizer=None):
        self.family, self.is_sd3, self.is_wan, self.use_shift = "anima", False, True, True
        self.text_processing_engine_anima = AnimaTextEngineStandIn(qwen_tokenizer, t5_tokenizer)
        self.transformer = AnimaStandIn().requires_grad_(False)
        self.kmodel = FlowKModelStandIn(self.transformer, PredictionDiscreteFlow5DStandIn(shift=3.0))
        self.forge_objects_after_applying_lora = ForgeObjects(UnetPatcherStandIn(self.kmodel))
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()
        self.encoded: list[str] = []

    def encode(self, prompt, is_negative=False, distilled_cfg_scale=None):
        self.encoded.append(prompt)
        with torch.no_grad():
            return self.text_processing_engine_anima([prompt])[0]


# --- Neo's txt2img for latents with a time axis --------------------------------------------------------
class VideoVAEWebUIStandIn(DiTWebUIStandIn):
    """Neo's video VAE (``is_wan``): decode_first_stage gives frames [B, 1, 3, H, W] for a latent
    [B, C, 1, H, W] (diffusion_engine/qwen.py, anima.py: ``.movedim(-1, 2)``), decode_latent_batch
    one [1, 3, H, W] per image (processing.py:611-618); the stand-in decoder of a 4-d latent as before."""

    def decode(self, model, latent):
        if latent.ndim == 5:
            return super().decode(model, latent[:, :, 0]).unsqueeze(1)
        return super().decode(model, latent)

    def encode(self, model, pixels, seed=None):
        """encode_first_stage of a video VAE: [B, C, 1, h, w] (one frame)."""
        return super().encode(model, pixels, seed).unsqueeze(2)


class VideoLatentTxt2ImgStandIn(DiTTxt2ImgStandIn):
    """Neo's txt2img for an ``is_wan`` model: the RNG's shape has the time axis, (C, 1, h, w)
    (processing.py:960), and the stock hires pass takes it off for the latent upscale and puts it
    back (:1480-1486)."""

    def __init__(self, model, webui, prompts, **kwargs):
        super().__init__(model, webui, prompts, **kwargs)
        self.rng = ImageRNGStandIn((16, 1, self.height // 8, self.width // 8), self.seeds)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        assert samples.ndim == 5, "the first pass of an is_wan model has the time axis"
        self.is_hr_pass = True
        target = (self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8)
        self.sampler = self.webui.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        samples = nn.functional.interpolate(samples.squeeze(2), size=target, mode="bilinear").unsqueeze(2)
        self.webui.state.nextjob()
        self.rng = ImageRNGStandIn(samples.shape[1:], self.seeds)
        noise = self.rng.next()
        self.calculate_hr_conds()
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=self.txt2img_image_conditioning(samples))
        self.is_hr_pass = False
        return self.webui.decode_batch(self.sd_model, samples)
