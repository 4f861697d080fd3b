"""Benchmark of the engine on a random-weight UNet: ``python -m accdiffusion.lab.bench``.

Prints, per target scale and window mode (overlap, shifted): window evaluations per stage against
the overlap formula ((2s−1)² + s²)·steps (per CFG row), the local branch's share, evaluations
skipped (branch weight < ε), UNet calls, the tile batch used (automatic by default), tile-prompt
encodes, time and peak memory; totals against the formula; the first pass's time with and
without attention recording, and what recording adds to one UNet call in FLOPs and dispatched
operations (on a GPU, kernel launches). ``--quality`` adds the seam measurement (overlap, overlap with
jitter, shifted) and the word-mask agreement of recording on a subset of steps.
The probe pass (img2img / Upscale button maps): its UNet calls and time against each tiled pass.
``--probe-agreement``: how well the probe's word masks agree (IoU) with the first pass's own
recorded masks on generated images, per set of probe timesteps (how PROBE_TIMESTEPS was chosen).

CPU default: the tiny SD1-like UNet. On a GPU: ``--device cuda --model sdxl-real --base 128`` (needs diffusers)
times a 1024² → 2048² / 4096² pass with SDXL widths (random weights); ``sdxl-real-tiny`` is the same
diffusers code path at tiny widths. ``--steps 50,20`` sets the hires steps per scale, ``--json`` writes
the figures to a file (rewritten after each run, so a run cut short keeps what it measured), and
without k-diffusion installed the built-in Euler sampler runs (``--sampler``). tools/device_check.sh
runs the GPU measurements in one command.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..method.probe import PROBE_TIMESTEPS, mask_iou
from ..method.prompts import build_word_masks
from .reference import Host, build_unet, first_pass, hires_pass, load_tokenizer, probe_pass, word_positions
from ..method.settings import FIELD_BY_NAME, AccDiffusionSettings

PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, high quality"
AGREEMENT_PROMPTS = (PROMPT, "a red fox sitting in tall grass under a blue sky",
                     "two cats on a sofa next to a window, evening light",
                     "a lighthouse on a rocky coast with waves and seagulls")
TIMESTEP_SETS: tuple[tuple[int, ...], ...] = (
    (200,), (300,), (400,), (500,), (600,), (700,), (800,), (900,),
    (300, 500, 700), (400, 550, 700), (500, 650, 800), (300, 400, 500, 600, 700, 800), (100, 300, 500, 700, 900))


def _masks(host: Host, prompt: str, token_maps: torch.Tensor) -> torch.Tensor:
    words, positions = word_positions(host, prompt)
    masks = build_word_masks(token_maps, positions)
    return masks.masks[masks.located]


def probe_agreement(host: Host, size: tuple[int, int], steps: int, seeds: int = 3,
                    sets: tuple[tuple[int, ...], ...] = TIMESTEP_SETS) -> list[tuple[tuple[int, ...], float, float]]:
    """Per timestep set: mean word-mask IoU of the probe on a generated image against that
    image's first-pass masks, and (control) against the masks of another image of the same prompt
    (another seed): a probe that reads the image beats the control."""
    cases = []
    for prompt in AGREEMENT_PROMPTS:
        for seed in range(seeds):
            latent, recorder = first_pass(host, [prompt], "", size, steps, seed=seed)
            cases.append((prompt, seed, latent, _masks(host, prompt, recorder.maps(0))))
    out = []
    for timesteps in sets:
        own, other = [], []
        for i, (prompt, seed, latent, first_masks) in enumerate(cases):
            recorder, _ = probe_pass(host, latent, [prompt], [seed], timesteps)
            probe_masks = _masks(host, prompt, recorder.maps(0))
            own.append(float(mask_iou(probe_masks, first_masks).mean()))
            control = next(c for c in cases if c[0] == prompt and c[1] != seed)
            other.append(float(mask_iou(probe_masks, control[3]).mean()))
        out.append((timesteps, sum(own) / len(own), sum(other) / len(other)))
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak CUDA allocation, or on the CPU the peak resident size above the start (polled)."""
    out = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated() - start
        return
    start, stop = _rss_bytes(), threading.Event()
    peak = [start]

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = peak[0] - start


class _OpCount(TorchDispatchMode):
    """Counts the ATen operations dispatched: on a GPU each non-view one is a kernel launch, and a
    recorder of many tiny per-layer products costs launches, not arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def recording_cost(host: Host, size: tuple[int, int]) -> dict[str, int]:
    """FLOPs and dispatched operations of one CFG UNet call (positive and negative row) without and
    with the first pass's recorder (its batched computation included): what recording adds on any
    device, GPU launch overhead included, measured where no GPU is."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..method.attention import AttentionRecorder, find_cross_attention

    device = next(host.unet.parameters()).device
    x = torch.randn(2, 4, *size, device=device)
    t = torch.full((2,), 500.0, device=device)
    conds = host.encode([PROMPT]) + host.encode([""])
    out: dict[str, int] = {}
    for name, record in (("plain", False), ("recording", True)):
        recorder = AttentionRecorder(size, 1) if record else None
        if recorder is not None:
            recorder.attach(find_cross_attention(host.unet, include_middle=False))
            recorder.row_images = [0, None]
        flops, ops = FlopCounterMode(display=False), _OpCount()
        try:
            with torch.no_grad(), flops, ops:
                host._eps(x, t, conds)
                if recorder is not None:
                    recorder.flush()
        finally:
            if recorder is not None:
                recorder.detach()
        out[f"{name}_flops"], out[f"{name}_ops"] = int(flops.get_total_flops()), ops.ops
    return out


@dataclass(frozen=True)
class DiTSize:
    """A full-size transformer at 1024² px (4096 image tokens: a 128² latent in 2×2 patches, or
    Klein's 64² latent at patch 1) as the host builds it."""

    family: str  # the recorder's family (jointattention.joint_family)
    blocks: int  # double-stream / joint / main blocks (kind "first")
    single: int  # single-stream blocks (Flux, Klein; kind "single")
    dim: int
    heads: int
    text: int  # text tokens the blocks see (Z-Image: before the pad to 32)
    # of the stand-ins' two-matrix MLP with the real MLP's FLOPs: a gated (SwiGLU) MLP of width
    # r·dim has three matrices, so it counts as 1.5·r
    mlp_ratio: float
    refiners: int = 0  # NextDiT's noise and context refiner blocks, of each
    context_dim: int = 0  # Z-Image's caption features, Anima's cross-attention context
    image_tokens: int = 4096


# Forge's Flux / Chroma / SD 3.5 and Neo's families: Neo backend/huggingface/<repo>/transformer/
# config.json and modules_forge/packages/huggingface_guess/detection.py (Z-Image: dim 3840, 30 layers,
# 30 heads without grouping, gated FFN int(8/3·3840) = 10240, 2 refiners of each kind, captions padded
# to 32; Qwen-Image: 60 blocks of 24 × 128, FeedForward × 4; Klein 4B / 9B: 5 + 20 / 8 + 24 blocks of
# 3072 / 4096 wide, gated MLP × 3; Anima: 28 blocks of 2048, 16 heads, GPT-2 MLP × 4, context 1024 wide;
# Ernie-Image: 36 layers of 4096, 32 heads, gated FFN 12288, patch 1 on its 64² latent).
# Text tokens of one ~75-token prompt as Neo sends it: Z-Image 83 (its chat template, kept), Qwen-Image
# 80 (the system template stripped), Klein and Anima 512 (padded by their engines), Ernie-Image 76
# (one start token, no template)
DIT_SIZES = {"flux-dev": DiTSize("flux", 19, 38, 3072, 24, 512, 4), "chroma": DiTSize("flux", 19, 38, 3072, 24, 512, 4),
             "sd3.5-large": DiTSize("mmdit", 38, 0, 2432, 38, 333, 4),
             "sd3.5-medium": DiTSize("mmdit", 24, 0, 1536, 24, 333, 4),
             "z-image": DiTSize("nextdit", 30, 0, 3840, 30, 83, 1.5 * 10240 / 3840, refiners=2, context_dim=2560),
             "qwen-image": DiTSize("qwen", 60, 0, 3072, 24, 80, 4),
             "klein-4b": DiTSize("flux", 5, 20, 3072, 24, 512, 1.5 * 3),
             "klein-9b": DiTSize("flux", 8, 24, 4096, 32, 512, 1.5 * 3),
             "anima": DiTSize("anima", 28, 0, 2048, 16, 512, 4, context_dim=1024),
             "ernie-image": DiTSize("ernie", 36, 0, 4096, 32, 76, 1.5 * 12288 / 4096)}
NEXTDIT_PAD = 32  # Z-Image's pad_tokens_multiple (huggingface_guess/detection.py)


def _dit_parts(size: DiTSize) -> tuple[torch.nn.Module, dict[str, tuple[int, Callable[[], object]]],
                                       dict[str, Callable[[], object]]]:
    """On the meta device: a model object with the family's block lists (one block of each kind,
    the stand-ins of tests/, at full width), per kind (blocks in the model, one block's call), and
    per recorded kind the call the capture needs to see it (Flux's single blocks learn the text
    length from the first double block, NextDiT's layers from the caption embedder)."""
    import sys

    tests = str(Path(__file__).resolve().parents[2] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import dit_standins as ds

    n, t, dim, heads = size.image_tokens, size.text, size.dim, size.heads
    half = dim // heads // 2
    nn = torch.nn
    with torch.device("meta"):
        model = nn.Module()
        img, txt, vec = torch.empty(1, n, dim), torch.empty(1, t, dim), torch.empty(1, dim)
        if size.family == "flux":
            model.double_blocks = nn.ModuleList([ds.DoubleStreamBlock(dim, heads, size.mlp_ratio)])
            model.single_blocks = nn.ModuleList([ds.SingleStreamBlock(dim, heads, size.mlp_ratio)])
            pe = torch.empty(1, 1, t + n, half, 2, 2)

            def double() -> object:
                return model.double_blocks[0](img=img, txt=txt, vec=vec, pe=pe)

            def single() -> object:
                return model.single_blocks[0](torch.cat([txt, img], 1), vec=vec, pe=pe)

            return model, {"first": (size.blocks, double), "single": (size.single, single)}, {
                "first": double, "single": lambda: (double(), single())}
        if size.family == "mmdit":
            model.joint_blocks = nn.ModuleList([ds.JointBlock(dim, heads, mlp_ratio=size.mlp_ratio)])

            def joint() -> object:
                return model.joint_blocks[0](txt, img, c=vec)

            return model, {"first": (size.blocks, joint)}, {"first": joint}
        import neo_ernie_standins as ne
        import neo_qwen_anima_standins as nqa
        import neo_standins as neo

        if size.family == "ernie":
            class ErnieShell(nn.Module):
                """The model around one layer: the capture reads the image's length from the model's ``x``."""

                patch_size = 1

                def __init__(self) -> None:
                    super().__init__()
                    self.x_embedder = nn.Identity()
                    self.layers = nn.ModuleList([ne.ErnieBlockStandIn(dim, heads, int(size.mlp_ratio * dim))])

                def forward(self, x: torch.Tensor) -> object:
                    return self.layers[0](torch.cat([img, txt], 1), rope, temb)

            model = ErnieShell()
            side = int(n ** 0.5)
            latent = torch.empty(1, 128, side, side)
            rope, temb = torch.empty(1, n + t, 1, half, 2, 2), [torch.empty(1, 1, dim)] * 6

            def layer() -> object:
                return model.layers[0](torch.cat([img, txt], 1), rope, temb)

            return model, {"first": (size.blocks, layer)}, {"first": lambda: model(latent)}

        if size.family == "qwen":
            model.transformer_blocks = nn.ModuleList([nqa.QwenImageTransformerBlock(dim, heads, size.mlp_ratio)])
            model.txt_norm = nn.Identity()  # what marks the family; not run here
            rope = torch.empty(1, t + n, 1, half, 2, 2)

            def block() -> object:
                return model.transformer_blocks[0](hidden_states=img, encoder_hidden_states=txt,
                                                   encoder_hidden_states_mask=None, temb=vec, image_rotary_emb=rope)

            return model, {"first": (size.blocks, block)}, {"first": block}
        if size.family == "anima":
            model.blocks = nn.ModuleList([nqa.AnimaBlock(dim, size.context_dim, heads, lora_dim=256,
                                                         mlp_ratio=size.mlp_ratio)])
            side = int(n ** 0.5)
            x5, emb = torch.empty(1, 1, side, side, dim), torch.empty(1, 1, dim)
            context, lora = torch.empty(1, 1, t, size.context_dim), torch.empty(1, 1, 3 * dim)
            rope = torch.empty(1, n, 1, half, 2, 2)

            def block() -> object:
                return model.blocks[0](x5, emb, context, rope_emb_L_1_1_D=rope, adaln_lora_B_T_3D=lora)

            return model, {"first": (size.blocks, block)}, {"first": block}
        if size.family == "nextdit":
            ffn = int(size.mlp_ratio * dim)
            model.layers = nn.ModuleList([neo.JointTransformerBlock(dim, heads, heads, ffn_hidden=ffn)])
            model.noise_refiner = nn.ModuleList([neo.JointTransformerBlock(dim, heads, heads, ffn_hidden=ffn)])
            model.context_refiner = nn.ModuleList([neo.JointTransformerBlock(dim, heads, heads, modulation=False,
                                                                             ffn_hidden=ffn)])
            model.cap_embedder = nn.Sequential(nn.RMSNorm(size.context_dim), nn.Linear(size.context_dim, dim))
            model.pad_tokens_multiple = NEXTDIT_PAD
            padded = t + -t % NEXTDIT_PAD
            caption, cap = torch.empty(1, t, size.context_dim), torch.empty(1, padded, dim)
            freqs = torch.empty(1, padded + n, 1, half, 2, 2)

            def layer() -> object:
                return model.layers[0](torch.cat([cap, img], 1), None, freqs, vec)

            def recorded() -> object:
                model.cap_embedder(caption)
                return layer()

            return model, {"first": (size.blocks, layer),
                           "noise_refiner": (size.refiners, lambda: model.noise_refiner[0](img, None, freqs[:, padded:], vec)),
                           "context_refiner": (size.refiners, lambda: model.context_refiner[0](cap, None, freqs[:, :padded]))
                           }, {"first": recorded}
    raise ValueError(f"no DiT family {size.family!r}")


def dit_recording_cost(name: str) -> dict[str, float]:
    """FLOPs and dispatched ops of a full-size DiT call (one image row) without and with recording,
    counted on the meta device (nothing is computed or allocated): one block of each kind at full
    width with the stand-in blocks of tests/ (the hosts' block structure), scaled by the model's
    block counts and by how many of each kind the recorder takes (the last quarter of the blocks).
    Recording adds per recorded block the image × all-keys product (Anima: × its 512 text keys), the
    softmax's log-sum-exp and the text share's sums."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..method.attention import AttentionRecorder
    from ..method.jointattention import JointAttentionCapture, late_block_count

    size = DIT_SIZES[name]
    model, kinds, recorded_calls = _dit_parts(size)
    blocks = {"first": (list(getattr(model, "double_blocks", None) or getattr(model, "joint_blocks", None)
                             or getattr(model, "transformer_blocks", None) or getattr(model, "blocks", None)
                             or model.layers))[0]}
    if size.single:
        blocks["single"] = model.single_blocks[0]
    recorded = late_block_count(size.blocks + size.single)
    recorded_single = min(size.single, recorded)
    recorded_counts = {"first": recorded - recorded_single, "single": recorded_single}
    side = int(size.image_tokens ** 0.5)

    def count(call: Callable[[], object], record: str | None = None) -> tuple[float, float]:
        flops, ops = FlopCounterMode(display=False), _OpCount()
        recorder = AttentionRecorder((side * 2, side * 2), 1, downsample=2)
        with torch.no_grad(), flops, ops:
            if record is None:
                call()
            else:
                with JointAttentionCapture(model, recorder, [0], blocks=[blocks[record]]):
                    call()
                recorder.flush()
        return float(flops.get_total_flops()), float(ops.ops)

    out: dict[str, float] = {}
    model_flops = 0.0
    for kind, (n, call) in kinds.items():
        if n:
            out[f"flops_per_{kind}_block"] = count(call)[0]
            model_flops += n * out[f"flops_per_{kind}_block"]
    added = 0.0
    for kind, n in recorded_counts.items():
        if n:
            plain_flops, plain_ops = count(recorded_calls[kind])
            flops, ops = count(recorded_calls[kind], kind)
            out[f"added_flops_per_{kind}_block"], out[f"added_ops_per_{kind}_block"] = flops - plain_flops, ops - plain_ops
            added += n * (flops - plain_flops)
    out["recorded_blocks"], out["blocks"] = float(recorded), float(size.blocks + size.single)
    out["model_flops"], out["recording_added_flops"], out["share"] = model_flops, added, added / model_flops
    return out


# T5-XXL v1.1's encoder, as Flux, Chroma and SD 3.5 use it (Forge backend/nn/t5.py with the
# checkpoints' config): model width, head width, heads, gated-GELU width, layers
T5_XXL = {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "num_layers": 24}


def t5_encoding_cost(tokens: int = 256, layers_timed: int = 1, dtype: torch.dtype = torch.float32,
                     sizes: dict[str, int] | None = None) -> dict[str, float]:
    """What one tile prompt's T5 encoding costs where Forge keeps T5 on the CPU: a randomly
    initialised encoder of T5-XXL's shape with ``layers_timed`` layers (transformers' T5 classes)
    timed on this machine's CPU for one sequence of ``tokens`` (Flux pads to 256), scaled to the
    full depth; plus its FLOPs, counted, so the time can be carried to another CPU."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5Config, T5EncoderModel

    shape = dict(T5_XXL, **(sizes or {}))
    depth = shape.pop("num_layers")
    config = T5Config(**shape, num_layers=layers_timed, feed_forward_proj="gated-gelu", vocab_size=32128)
    model = T5EncoderModel(config).to(dtype).eval()
    ids = torch.randint(0, 32000, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        counter = FlopCounterMode(display=False)
        with counter:
            model(input_ids=ids)
        start = time.perf_counter()
        model(input_ids=ids)
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "layers": depth, "threads": torch.get_num_threads(),
            "seconds_per_layer": seconds / layers_timed, "seconds": seconds / layers_timed * depth,
            "flops": float(counter.get_total_flops()) / layers_timed * depth}


# Neo's LLM text encoders (backend/huggingface/<repo>/text_encoder/config.json; Anima's names only the
# width, 1024: the rest is Neo's Qwen3_06BConfig, backend/nn/llm/llama.py:22-41)
QWEN3_4B = {"hidden_size": 2560, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": 9728, "num_hidden_layers": 36}
QWEN3_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "intermediate_size": 12288, "num_hidden_layers": 36}
QWEN25_VL_7B_TEXT = {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "head_dim": 128,
                     "intermediate_size": 18944, "num_hidden_layers": 28}
QWEN3_06B = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "intermediate_size": 3072, "num_hidden_layers": 28}
# Ernie-Image's Ministral-3 3B (baidu/ERNIE-Image/text_encoder/config.json text_config; Neo's
# Ministral3_3BConfig, llama.py:149-170): a Llama-type decoder, no biases, no q/k norms
MINISTRAL3_3B = {"hidden_size": 3072, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "intermediate_size": 9216, "num_hidden_layers": 26}


@dataclass(frozen=True)
class LLMEncoder:
    shape: dict[str, int]
    qwen2: bool  # Qwen2.5's attention (q, k, v biases); else Qwen3's (no biases, per-head q/k norms)
    needed_layers: int  # layers up to the deepest hidden state the engine reads
    tokens: int  # one 75-token prompt in the engine's template, counted with Neo's tokenizer
    reads: str


# Neo runs every layer whatever the engine reads (Llama2_.forward loops over all of them,
# llama.py:486-507), so a prompt costs the full depth; needed_layers is what stopping early would cost
LLM_ENCODERS = {
    "z-image": LLMEncoder(QWEN3_4B, False, 35, 83, "the second-to-last layer's output (qwen3_engine.py: -2)"),
    "klein-4b": LLMEncoder(QWEN3_4B, False, 27, 512, "the inputs of layers 9, 18, 27 (klein_engine.py), padded to 512"),
    "klein-9b": LLMEncoder(QWEN3_8B, False, 27, 512, "the inputs of layers 9, 18, 27 (klein_engine.py), padded to 512"),
    "qwen-image": LLMEncoder(QWEN25_VL_7B_TEXT, True, 28, 114, "the last layer, normed (qwen_engine.py)"),
    "anima": LLMEncoder(QWEN3_06B, False, 28, 75, "the last layer, normed, then the LLM adapter (anima_engine.py)"),
    "ernie-image": LLMEncoder(MINISTRAL3_3B, False, 25, 76, "the second-to-last layer's output (ministral3_engine.py: -2)"),
}


def _llm_config(encoder: LLMEncoder, layers: int, sizes: dict[str, int] | None):  # type: ignore[no-untyped-def]
    """A transformers config of the encoder's shape with ``layers`` layers. The pinned transformers
    (4.46) has no Qwen3 classes: Llama's has the same projections (an explicit head width, no
    biases), lacking only Qwen3's per-head q/k RMSNorm, which has no matrix product to count."""
    import transformers

    shape = dict(encoder.shape, **(sizes or {}), num_hidden_layers=layers)
    # a tiny vocabulary: the bench feeds embeddings, as Neo's engines do, and skips a 0.6-2 GB table
    common = dict(shape, vocab_size=8, attn_implementation="eager")  # eager: every product counted
    if encoder.qwen2:
        if shape["num_attention_heads"] * shape["head_dim"] != shape["hidden_size"]:
            raise ValueError("Qwen2's attention has no head width of its own: heads × head_dim must be the width")
        common.pop("head_dim")
        return transformers.Qwen2Config(**common)
    if hasattr(transformers, "Qwen3Config"):
        return transformers.Qwen3Config(**common)
    return transformers.LlamaConfig(**common, attention_bias=False)


def llm_encoding_cost(name: str, tokens: int, layers_timed: int = 1, dtype: torch.dtype = torch.float32,
                      sizes: dict[str, int] | None = None) -> dict[str, float]:
    """What one tile prompt's encoding by a Neo family's LLM text encoder costs where Neo keeps it on
    the CPU: a randomly initialised model of the encoder's shape with ``layers_timed`` layers
    (transformers' classes) timed on this CPU for one sequence of ``tokens``, scaled to the layers
    Neo runs (all of them) and to those the engine reads; plus the FLOPs, counted."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    encoder = LLM_ENCODERS[name]
    model = AutoModel.from_config(_llm_config(encoder, layers_timed, sizes)).to(dtype).eval()
    width = model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, tokens, width, generator=generator).to(dtype)
    with torch.no_grad():
        model(inputs_embeds=embeds[:, :16])  # warm-up (kernels, allocator), short: bf16 is slow here
        counter = FlopCounterMode(display=False)
        with counter:
            model(inputs_embeds=embeds)
        runs = []
        for _ in range(2):  # the better of two: others' work on this shared machine only slows a run
            start = time.perf_counter()
            model(inputs_embeds=embeds)
            runs.append(time.perf_counter() - start)
        seconds = min(runs) / layers_timed
    depth = encoder.shape["num_hidden_layers"]
    per_layer = float(counter.get_total_flops()) / layers_timed
    return {"tokens": tokens, "layers": depth, "needed_layers": encoder.needed_layers,
            "threads": torch.get_num_threads(), "seconds_per_layer": seconds, "seconds": seconds * depth,
            "seconds_needed": seconds * encoder.needed_layers, "flops_per_layer": per_layer,
            "flops": per_layer * depth, "flops_needed": per_layer * encoder.needed_layers}


def _print_recording_cost(host: Host, size: tuple[int, int], autocast) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with autocast:
        cost = recording_cost(host, size)
    print(f"  one CFG UNet call at {size[1] * 8}x{size[0] * 8} px: recording adds "
          f"{cost['recording_flops'] - cost['plain_flops']:,} FLOPs to {cost['plain_flops']:,} "
          f"({(cost['recording_flops'] / cost['plain_flops'] - 1) * 100:.2f} %) and "
          f"{cost['recording_ops'] - cost['plain_ops']} dispatched ops to {cost['plain_ops']} "
          f"({(cost['recording_ops'] / cost['plain_ops'] - 1) * 100:.1f} %: its share where launches bound the GPU)")
    return cost


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mask_iou(a, b) -> float:
    """Mean IoU over words of two recorders' opened word masks (image 0, token = word)."""
    from ..method.prompts import build_word_masks

    maps_a, maps_b = a.maps(0), b.maps(0)
    words = [[i] for i in range(1, maps_a.shape[0]) if float(maps_a[i].std()) > 0]
    ma, mb = build_word_masks(maps_a, words).masks, build_word_masks(maps_b, words).masks
    inter = (ma & mb).flatten(1).sum(1).float()
    union = (ma | mb).flatten(1).sum(1).float().clamp_min(1)
    return float((inter / union).mean())


def _seam_score(x: torch.Tensor) -> float:
    """Seam visibility of a latent: the largest column (row) mean of |∂x| over the median one,
    for both axes; 1 = no column stands out, a fixed seam shows as a peak."""
    scores = []
    for dim in (-1, -2):
        grad = x.diff(dim=dim).abs()
        profile = grad.mean(dim=[d for d in range(grad.ndim) if d != grad.ndim + dim])[2:-2]  # not the border
        scores.append(float(profile.max() / profile.median()))
    return max(scores)


def steps_per_scale(steps: str, scales: list[int]) -> list[int]:
    """``--steps``: one count for every scale, or one per scale (``50,20`` with ``--scales 2,4``)."""
    counts = [int(n) for n in steps.split(",")]
    if len(counts) == 1:
        counts *= len(scales)
    if len(counts) != len(scales) or min(counts) < 1:
        raise ValueError(f"--steps {steps!r}: give one count >= 1, or one per scale ({len(scales)})")
    return counts


def use_builtin_sampler(choice: str) -> bool:
    """``auto``: k-diffusion's samplers where it imports, else the built-in Euler."""
    if choice != "auto":
        return choice == "builtin"
    try:
        import k_diffusion  # noqa: F401
    except ImportError:
        return True
    return False


def write_json(path: str | None, report: dict) -> None:
    """Replace the file whole, so a reader (or a run killed at its time limit) never sees half of it."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    """The command line, without running anything (tests/test_docs_commands.py parses the commands
    the docs show with it)."""
    here = Path(__file__).resolve().parents[2]  # the repository
    # no abbreviations: a shortened flag in a doc or script breaks silently once another flag
    # shares its prefix
    parser = argparse.ArgumentParser(prog="python -m accdiffusion.lab.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="sd1", choices=["sd1", "sdxl", "sdxl-size", "sdxl-real", "sdxl-real-tiny"])
    parser.add_argument("--base", type=int, default=32, help="first-pass latent side (image px / 8)")
    parser.add_argument("--scales", default="2,3,4")
    parser.add_argument("--modes", default="overlap,shifted")
    parser.add_argument("--window-grain", type=int, default=FIELD_BY_NAME["window_grain"].default,
                        help="shifted windows' offset and cut grain in latent px (0 = the UNet's size multiple, "
                             "as before the setting existed); default: the setting's default")
    parser.add_argument("--steps", default="4", help="hires steps per stage: one count, or one per scale")
    parser.add_argument("--first-steps", type=int, default=4)
    parser.add_argument("--denoise", type=float, default=0.6)
    parser.add_argument("--tile-batch-size", type=int, default=0, help="0 = automatic")
    parser.add_argument("--fp16", action="store_true", help="autocast to float16 (GPU)")
    parser.add_argument("--sampler", default="auto", choices=["auto", "k-diffusion", "builtin"],
                        help="Euler from k-diffusion or built in (auto: k-diffusion where installed)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--probe-agreement", action="store_true",
                        help="only measure probe/first-pass word-mask agreement per timestep set")
    parser.add_argument("--quality", action="store_true",
                        help="also measure seams (overlap, overlap + jitter, shifted) and mask agreement "
                             "of recording on a subset of steps")
    parser.add_argument("--recording-cost", action="store_true",
                        help="only what recording adds to one UNet call (FLOPs, dispatched ops); with "
                             "--device meta it counts full-size models without computing anything")
    parser.add_argument("--recording-cost-dit", action="store_true",
                        help="what recording adds to one call of full-size Flux / Chroma / SD 3.5 and Neo's Z-Image, "
                             "Qwen-Image, Flux.2 Klein, Anima, Ernie-Image (FLOPs, counted on the meta device)")
    parser.add_argument("--t5-cost", action="store_true",
                        help="what one distinct tile prompt's T5-XXL encoding costs on this CPU (Flux, Chroma, "
                             "SD 3.5 with T5, where Forge keeps T5 on the CPU): one layer timed, scaled to 24")
    parser.add_argument("--llm-cost", action="store_true",
                        help="what one distinct tile prompt's encoding by Neo's LLM text encoders costs on this "
                             "CPU (Z-Image, Flux.2 Klein 4B / 9B, Qwen-Image, Anima, Ernie-Image): one layer timed, scaled to "
                             "the depth; at 100 and 300 tokens and the engine's own count")
    parser.add_argument("--llm-dtypes", default="float32,bfloat16,float16",
                        help="--llm-cost's dtypes (Neo's default for its text encoders is float16, on the CPU too)")
    parser.add_argument("--tokenizer", default=os.environ.get(
        "ACCDIFFUSION_TOKENIZER_DIR", str(here.parent / "shared" / "tinymodel" / "clip-text-tiny")))
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.t5_cost:
        for tokens in (256, 512):
            cost = t5_encoding_cost(tokens)
            print(f"  T5-XXL encoder, {tokens} tokens, float32, {cost['threads']} thread(s): "
                  f"{cost['seconds']:.1f} s per prompt ({cost['seconds_per_layer']:.2f} s a layer x "
                  f"{cost['layers']}), {cost['flops'] / 1e12:.2f} TFLOP")
        return
    if args.llm_cost:
        for dtype in (getattr(torch, name) for name in args.llm_dtypes.split(",")):
            for name, encoder in LLM_ENCODERS.items():
                for tokens in sorted({100, 300, encoder.tokens}):
                    cost = llm_encoding_cost(name, tokens, dtype=dtype)
                    own = " (a 75-token prompt as Neo sends it)" if tokens == encoder.tokens else ""
                    print(f"  {name}, {tokens} tokens{own}, {str(dtype).removeprefix('torch.')}, "
                          f"{cost['threads']} thread(s): {cost['seconds']:.1f} s per prompt ({cost['seconds_per_layer']:.2f} s "
                          f"a layer x {cost['layers']}; {cost['seconds_needed']:.1f} s to layer {cost['needed_layers']}), "
                          f"{cost['flops'] / 1e12:.3f} TFLOP", flush=True)
        return
    if args.recording_cost_dit:
        for name in DIT_SIZES:
            cost = dit_recording_cost(name)
            added_ops = ", ".join(f"{kind} {cost[key]:.0f}" for kind in ("first", "single")
                                  if (key := f"added_ops_per_{kind}_block") in cost)
            print(f"  {name} at 1024x1024 px, one row, {cost['recorded_blocks']:.0f} of {cost['blocks']:.0f} blocks "
                  f"recorded: recording adds {cost['recording_added_flops']:.3e} FLOPs to {cost['model_flops']:.3e} "
                  f"({cost['share'] * 100:.2f} %); dispatched ops added per recorded block: {added_ops}")
        return
    scales = [int(s) for s in args.scales.split(",")]
    try:
        scale_steps = steps_per_scale(args.steps, scales)
    except ValueError as error:
        parser.error(str(error))

    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    builtin = use_builtin_sampler(args.sampler)
    host = Host(build_unet(args.model, device=device), load_tokenizer(args.tokenizer),
                vector_conditioning=args.model != "sd1", builtin_sampler=builtin).to(device)
    size = (args.base, args.base)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=args.fp16) if args.fp16 else nullcontext()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    params = sum(p.numel() for p in host.unet.parameters())
    sampler = "built-in Euler" if builtin else "k-diffusion Euler"
    print(f"device {device} ({device_name}), torch {torch.__version__}, model {args.model}, "
          f"UNet params {params / 1e6:.1f} M, first pass {args.base * 8}x{args.base * 8} px, "
          f"hires steps {','.join(map(str, scale_steps))} (scales {args.scales}), denoise {args.denoise}, "
          f"tile batch {args.tile_batch_size or 'automatic'}, fp16 {args.fp16}, sampler {sampler}")
    report: dict = {"device": device_name, "torch": torch.__version__, "model": args.model, "unet_params": params,
                    "first_pass_px": args.base * 8, "denoise": args.denoise, "tile_batch_size": args.tile_batch_size,
                    "fp16": args.fp16, "sampler": sampler, "runs": []}

    if args.recording_cost:
        _print_recording_cost(host, size, autocast)
        return
    if args.probe_agreement:
        print(f"probe agreement: word-mask IoU with the first pass's own maps ({len(AGREEMENT_PROMPTS)} prompts x 3 "
              f"seeds, first pass {args.first_steps} steps); control = another seed's first pass")
        with autocast:
            for timesteps, own, other in probe_agreement(host, size, args.first_steps):
                mark = " (PROBE_TIMESTEPS)" if tuple(timesteps) == PROBE_TIMESTEPS else ""
                print(f"  t = {','.join(map(str, timesteps)):<28} own {own:.3f}  control {other:.3f}  "
                      f"margin {own - other:+.3f}{mark}")
        return

    with autocast:
        first_pass(host, [PROMPT], "", size, 1, seed=0)  # warm-up
        timings: dict[bool, list[float]] = {}
        for record in (False, True, False, True, False, True):
            _sync(device)
            start = time.perf_counter()
            latent, recorder = first_pass(host, [PROMPT], "", size, args.first_steps, seed=0, record=record)
            _sync(device)
            timings.setdefault(record, []).append(time.perf_counter() - start)
    plain, recorded = min(timings[False]), min(timings[True])
    print(f"first pass ({args.first_steps} steps): {plain:.3f} s plain, {recorded:.3f} s recording, overhead "
          f"{(recorded / plain - 1) * 100:.1f} %; recorder holds {recorder.nbytes()} bytes "
          f"(grid {recorder.grid[0]}x{recorder.grid[1]}, {recorder.sums.shape[1]} tokens, 1 image)")
    report["first_pass"] = {"steps": args.first_steps, "plain_s": plain, "recording_s": recorded,
                            "recording_ratio": recorded / plain, "recorder_bytes": recorder.nbytes(),
                            "one_call": _print_recording_cost(host, size, autocast)}
    write_json(args.json, report)
    if args.quality:
        for every in (2, 3):
            with autocast:
                _, subset = first_pass(host, [PROMPT], "", size, args.first_steps, seed=0, record_every=every)
            print(f"  recording every {every}th step: word-mask IoU against every step {_mask_iou(recorder, subset):.3f}")

    with autocast:
        probe_times = []
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            _, probe_stats = probe_pass(host, latent, [PROMPT], [0])
            _sync(device)
            probe_times.append(time.perf_counter() - start)
    probe_time = min(probe_times)
    print(f"probe pass at {args.base * 8}x{args.base * 8} px: {probe_stats.unet_calls} UNet calls "
          f"(timesteps {PROBE_TIMESTEPS}, positive prompt only), {probe_time:.3f} s")
    report["probe"] = {"unet_calls": probe_stats.unet_calls, "seconds": probe_time}
    write_json(args.json, report)

    totals: dict[str, dict[str, int]] = {}
    for scale, steps_here in zip(scales, scale_steps):
        target = (args.base * scale, args.base * scale)
        for mode in args.modes.split(","):
            settings = AccDiffusionSettings(enabled=True, tile_batch_size=args.tile_batch_size, window_mode=mode,
                                            window_grain=args.window_grain)
            grain = f", grain {args.window_grain or 'size multiple'}" if mode == "shifted" else ""
            with autocast, peak_memory(device) as mem:
                _sync(device)
                start = time.perf_counter()
                result = hires_pass(host, latent, [PROMPT], "", recorder, settings, target, steps_here,
                                    args.denoise, seed=0)
                _sync(device)
                elapsed = time.perf_counter() - start
            per_step = elapsed / (steps_here * len(result.stages))
            print(f"\n{scale}x {mode}{grain} -> {target[1] * 8}x{target[0] * 8} px, {steps_here} steps per stage: "
                  f"{elapsed:.2f} s ({per_step:.3f} s per step on average), "
                  f"peak memory {mem['peak'] / 2**20:.1f} MiB")
            total = totals.setdefault(f"{scale}x {mode}", {"local": 0, "all": 0, "formula_local": 0, "formula": 0})
            run = {"scale": scale, "mode": mode, "window_grain": settings.window_grain, "steps": steps_here, "target_px": [target[0] * 8, target[1] * 8],
                   "seconds": elapsed, "seconds_per_step": per_step, "peak_mib": mem["peak"] / 2**20, "stages": []}
            for stage, stats, encodes in zip(result.stages, result.stage_stats, result.stage_encodes):
                s = stage.dilation
                steps = stats.steps
                formula_local = (2 * s - 1) ** 2 * steps
                formula = formula_local + s * s * steps
                rows = 2
                total["local"] += stats.local_evals // rows
                total["all"] += stats.window_evals // rows
                total["formula_local"] += formula_local
                total["formula"] += formula
                print(f"  stage {stage.index} ({stage.scale:g}x, latent {stage.size[1]}x{stage.size[0]}, s={s}): "
                      f"window evals per CFG row {stats.window_evals // rows} (local {stats.local_evals // rows}) "
                      f"against the overlap formula ((2s-1)^2 + s^2)*steps = {formula} (local {formula_local}); "
                      f"skipped {stats.skipped_evals // rows} (local {stats.skipped_local_evals // rows}, "
                      f"dilated {stats.skipped_dilated_evals // rows}); {stats.unet_calls} UNet calls; "
                      f"batch {stats.tile_batch}; {encodes} tile-prompt encodes")
                run["stages"].append({
                    "index": stage.index, "scale": stage.scale, "latent": list(stage.size), "dilation": s,
                    "steps": steps, "window_evals": stats.window_evals // rows, "local_evals": stats.local_evals // rows,
                    "formula": formula, "formula_local": formula_local, "skipped_evals": stats.skipped_evals // rows,
                    "unet_calls": stats.unet_calls, "tile_batch": stats.tile_batch, "encodes": encodes,
                    # what the UNet was given, padding included: evaluations × their padded size
                    "latent_pixels": stats.latent_pixels // rows})
            calls = sum(st.unet_calls for st in result.stage_stats)
            print(f"  probe vs this tiled pass: {probe_stats.unet_calls} / {calls} UNet calls, "
                  f"{probe_time:.3f} / {elapsed:.2f} s = {100 * probe_time / elapsed:.2f} % of the time")
            run["window_evals"] = sum(st["window_evals"] for st in run["stages"])
            run["formula"] = sum(st["formula"] for st in run["stages"])
            run["latent_pixels"] = sum(st["latent_pixels"] for st in run["stages"])
            print(f"  latent pixels given to the UNet per CFG row (padding included): {run['latent_pixels']}")
            report["runs"].append(run)
            write_json(args.json, report)
    print("\ntotals per CFG row (window evaluations; ratio to the overlap formula):")
    for name, t in totals.items():
        print(f"  {name}: local {t['local']} / {t['formula_local']} = {t['local'] / t['formula_local']:.3f}, "
              f"whole pass {t['all']} / {t['formula']} = {t['all'] / t['formula']:.3f}")

    if args.quality:
        _quality(host, latent, recorder, args, autocast, steps=scale_steps[0])


def _quality(host, latent, recorder, args, autocast, steps: int) -> None:
    """Seams of the local branch alone (dilated sampling and skip residual off, so only the window
    schedule differs), against the untiled pass (one window = the whole latent: no seams by construction):
    relative RMS distance and the seam score, mean over seeds."""
    scale = 2
    target = (args.base * scale, args.base * scale)
    base = AccDiffusionSettings(enabled=True, dilated_sampling=False, patch_prompts=False, skip_residual=False,
                                tile_batch_size=args.tile_batch_size, window_mode="overlap")
    runs = {"untiled": (base.replace(window_size=min(512, target[0])), 0),
            "overlap": (base, 0), "overlap + jitter": (base, max(1, args.base // 8)),
            "shifted": (base.replace(window_mode="shifted"), 0)}
    print(f"\nseams at {scale}x, local branch only, {steps} steps, denoise 1, seeds 0-2:")
    results: dict[str, list[torch.Tensor]] = {}
    for name, (settings, jitter) in runs.items():
        for seed in range(3):
            with autocast:
                out = hires_pass(host, latent, [PROMPT], "", recorder, settings, target, steps,
                                 1.0, seed=seed, jitter=jitter).latent.float().cpu()
            results.setdefault(name, []).append(out)
    for name, outs in results.items():
        dist = sum(float((o - u).pow(2).mean().sqrt() / u.pow(2).mean().sqrt())
                   for o, u in zip(outs, results["untiled"])) / len(outs)
        seam = sum(_seam_score(o) for o in outs) / len(outs)
        print(f"  {name}: seam score {seam:.3f}, distance to untiled {dist:.3f}")


if __name__ == "__main__":
    main()
