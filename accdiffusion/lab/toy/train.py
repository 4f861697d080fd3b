"""Train the toy model on synthetic scenes: ε-prediction on SD's schedule, ~10 % empty captions,
a wall-clock budget (the learning rate follows elapsed time, so a budget gives a full schedule),
EMA weights saved every few hundred steps so an interrupted run still leaves usable weights."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..reference import sd_alphas_cumprod
from .model import WEIGHTS, TOKENIZER_DIR, build_text_encoder, build_unet, encode_ids, save_weights
from .scenes import make_scene, scene_latent

TRAIN_SEED_OFFSET = 1_000_000  # training scenes never share a seed with evaluation scenes



def optimise_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, ema_params: list, step: int) -> None:
    """One clipped AdamW step, then the EMA copy follows with a decay that warms up to 0.995 (both toys)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    decay = min(0.995, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            e.lerp_(p, 1 - decay)

def build_dataset(count: int, tokenizer, patch: int | None = None, context_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and context ids of the training scenes (``patch``/``context_ids``: the flow toy's
    finer latent code and its one-sequence ids)."""
    latents, ids = [], []
    for i in range(count):
        scene = make_scene(TRAIN_SEED_OFFSET + i)
        latents.append(scene_latent(scene) if patch is None else scene_latent(scene, patch))
        ids.append(host_context_ids(tokenizer, scene.caption) if context_ids is None
                   else context_ids(_TokenizerOnly(tokenizer), scene.caption))
    return torch.stack(latents), torch.tensor(ids)


def host_context_ids(tokenizer, prompt: str) -> list[int]:
    """The exact context ids the reference host feeds the model for ``prompt``."""
    from ..reference import Host

    return Host.context_ids(_TokenizerOnly(tokenizer), prompt)  # type: ignore[arg-type]


class _TokenizerOnly:
    """Just enough of a Host for ``Host.context_ids`` (the exact ids the sampler will see)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def set_learning_rate(opt: torch.optim.Optimizer, lr: float, step: int, frac: float) -> None:
    """Both toys' schedule: 50 warm-up steps, then cosine decay to 10 % over the wall-clock budget
    (``frac``: the share of it spent)."""
    scale = min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    for g in opt.param_groups:
        g["lr"] = lr * scale


def draw_batch(rng: np.random.Generator, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
               batch: int, empty_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, caption ids) of ``batch`` random scenes, half flipped left-right, ``empty_share``
    of the captions emptied (for CFG); the draws in the order both trainers always made them."""
    index = torch.from_numpy(rng.integers(0, latents.shape[0], batch))
    x0 = latents[index]
    flip = torch.from_numpy(rng.random(batch) < 0.5)
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    cond = ids[index].clone()
    cond[torch.from_numpy(rng.random(batch) < empty_share)] = empty_ids
    return x0, cond


def log_loss(loss: float, step: int, running: list[float], history: list, every: int, start: float,
             opt: torch.optim.Optimizer) -> None:
    """Keep ``loss``; every ``every`` steps, their mean into ``history`` and a progress line."""
    running.append(loss)
    if step % every == 0:
        mean = sum(running) / len(running)
        history.append((step, round(time.time() - start, 1), round(mean, 4)))
        print(f"step {step} t {time.time() - start:.0f}s loss {mean:.4f} lr {opt.param_groups[0]['lr']:.2e}", flush=True)
        running.clear()


def train(minutes: float = 40.0, batch: int = 64, scenes: int = 24000, lr: float = 1.5e-3,
          empty_share: float = 0.1, out: Path = WEIGHTS, seed: int = 0, log_every: int = 25,
          save_every: int = 200) -> dict:
    from ..reference import load_tokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    t0 = time.time()
    latents, ids = build_dataset(scenes, tokenizer)
    empty_ids = ids.new_tensor(host_context_ids(tokenizer, ""))
    print(f"dataset: {scenes} scenes in {time.time() - t0:.0f} s", flush=True)

    unet, text_model = build_unet().train(), build_text_encoder().train()
    params = [p for p in list(unet.parameters()) + list(text_model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_model).eval()
    ema_params = [p for p in list(ema_unet.parameters()) + list(ema_text.parameters()) if p.requires_grad]
    alphas = sd_alphas_cumprod()
    budget = minutes * 60.0
    start = time.time()
    step, running, history = 0, [], []
    while True:
        elapsed = time.time() - start
        if elapsed >= budget:
            break
        frac = elapsed / budget
        set_learning_rate(opt, lr, step, frac)
        x0, cond = draw_batch(rng, latents, ids, empty_ids, batch, empty_share)
        t = torch.from_numpy(rng.integers(0, len(alphas), batch))
        a = alphas[t].view(-1, 1, 1, 1)
        noise = torch.randn_like(x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = encode_ids(text_model, cond)
        pred = unet(xt, timesteps=t, context=[context])
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimise_step(opt, loss, params, ema_params, step)
        step += 1
        log_loss(loss.item(), step, running, history, log_every, start, opt)
        if step % save_every == 0:
            _save(out, ema_unet, ema_text, step, start, history, batch, scenes, empty_share)
    meta = _save(out, ema_unet, ema_text, step, start, history, batch, scenes, empty_share)
    print(f"done: {step} steps in {time.time() - start:.0f} s → {out}", flush=True)
    return meta


def _save(out, unet, text_model, step, start, history, batch, scenes, empty_share) -> dict:
    meta = {"steps": step, "seconds": round(time.time() - start), "batch": batch, "scenes": scenes,
            "empty_caption_share": empty_share, "loss_history": history[-400:]}
    save_weights(Path(out), unet, text_model, meta)
    return meta


# --- the flow toy ------------------------------------------------------------------------------------
def sample_flow_sigmas(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels: logit-normal (SD3's choice: most weight on the middle of the path)."""
    return torch.sigmoid(torch.randn(batch, generator=generator))


def flow_loss(model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
              pooled: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_σ = (1 − σ)·x₀ + σ·ε, target velocity ε − x₀."""
    from .flow import flow_noised

    xt = flow_noised(x0, noise, sigma.view(-1, 1, 1, 1))
    return torch.nn.functional.mse_loss(model(xt, sigma, context, pooled), noise - x0)


def train_flow(minutes: float = 30.0, batch: int = 64, scenes: int = 24000, lr: float = 1e-3,
               empty_share: float = 0.1, out: Path | None = None, seed: int = 0, log_every: int = 25,
               save_every: int = 100, config=None, max_steps: int | None = None) -> dict:
    from ..reference import load_tokenizer
    from .flow import FLOW_WEIGHTS, SCENE_PATCH, FlowConfig, FlowHost, build_flow, save_flow_weights

    out = Path(out or FLOW_WEIGHTS)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    t0 = time.time()
    latents, ids = build_dataset(scenes, tokenizer, patch=SCENE_PATCH, context_ids=FlowHost.context_ids)
    empty_ids = ids.new_tensor(FlowHost.context_ids(_TokenizerOnly(tokenizer), ""))  # type: ignore[arg-type]
    print(f"dataset: {scenes} scenes in {time.time() - t0:.0f} s", flush=True)

    model, text_model = build_flow(config or FlowConfig(), seed)
    model.train(), text_model.train()
    params = [p for p in list(model.parameters()) + list(text_model.parameters()) if p.requires_grad]
    print(f"parameters: {sum(p.numel() for p in params) / 1e6:.2f} M trainable", flush=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_model, ema_text = copy.deepcopy(model).eval(), copy.deepcopy(text_model).eval()
    ema_params = [p for p in list(ema_model.parameters()) + list(ema_text.parameters()) if p.requires_grad]
    budget = minutes * 60.0
    start = time.time()
    step, running, history = 0, [], []
    while (max_steps is None or step < max_steps) and time.time() - start < budget:
        frac = (time.time() - start) / budget
        set_learning_rate(opt, lr, step, frac)
        x0, cond = draw_batch(rng, latents, ids, empty_ids, batch, empty_share)
        encoded = text_model(input_ids=cond)
        loss = flow_loss(model, x0, torch.randn(x0.shape, generator=generator), sample_flow_sigmas(batch, generator),
                         encoded.last_hidden_state, encoded.pooler_output)
        optimise_step(opt, loss, params, ema_params, step)
        step += 1
        log_loss(loss.item(), step, running, history, log_every, start, opt)
        if step % save_every == 0:
            _save_flow(out, ema_model, ema_text, step, start, history, batch, scenes, empty_share, save_flow_weights)
    meta = _save_flow(out, ema_model, ema_text, step, start, history, batch, scenes, empty_share, save_flow_weights)
    print(f"done: {step} steps in {time.time() - start:.0f} s → {out}", flush=True)
    return meta


def _save_flow(out, model, text_model, step, start, history, batch, scenes, empty_share, save) -> dict:
    meta = {"steps": step, "seconds": round(time.time() - start), "batch": batch, "scenes": scenes,
            "empty_caption_share": empty_share, "loss_history": history[-400:],
            "objective": "rectified flow, velocity, logit-normal sigma"}
    save(Path(out), model, text_model, meta)
    return meta


# --- the flow-llm toy: single-stream, chat-template causal text encoder ---------------------------------
def train_flow_llm(minutes: float = 30.0, batch: int = 64, scenes: int = 24000, lr: float = 1e-3,
                   empty_share: float = 0.1, out: Path | None = None, seed: int = 0, log_every: int = 25,
                   save_every: int = 100, config=None, max_steps: int | None = None) -> dict:
    """The flow toy's recipe (rectified flow, logit-normal σ, flips, 10 % empty captions, AdamW with
    warm-up and cosine decay over the wall-clock budget, EMA) for :mod:`.llm`'s model. Captions are
    the template-wrapped ids, right-padded to the data set's longest with the pad token, which no
    caption holds, so the mask is ``ids != pad`` after any draw; an empty caption is the template
    around "" (what CFG's negative is)."""
    from .flow import SCENE_PATCH
    from .llm import LLM_WEIGHTS, LLMFlowConfig, ToyLLMTokenizer, build_llm_flow, pad_ids, save_llm_weights, \
        template_ids

    out = Path(out or LLM_WEIGHTS)
    config = config or LLMFlowConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = ToyLLMTokenizer()
    pad = tokenizer.pad_token_id
    t0 = time.time()
    latents, rows = [], []
    for i in range(scenes):
        scene = make_scene(TRAIN_SEED_OFFSET + i)
        latents.append(scene_latent(scene, SCENE_PATCH))
        rows.append(template_ids(tokenizer, scene.caption, config.max_text))
    empty = template_ids(tokenizer, "", config.max_text)
    ids, _ = pad_ids(rows + [empty], pad)
    ids, empty_ids = ids[:-1], ids[-1]
    latents_t = torch.stack(latents)
    print(f"dataset: {scenes} scenes in {time.time() - t0:.0f} s; context {ids.shape[1]} tokens at most", flush=True)

    model, text_model = build_llm_flow(config, seed)
    model.train(), text_model.train()
    params = [p for p in list(model.parameters()) + list(text_model.parameters()) if p.requires_grad]
    print(f"parameters: {sum(p.numel() for p in params) / 1e6:.2f} M trainable", flush=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_model, ema_text = copy.deepcopy(model).eval(), copy.deepcopy(text_model).eval()
    ema_params = [p for p in list(ema_model.parameters()) + list(ema_text.parameters()) if p.requires_grad]
    budget = minutes * 60.0
    start = time.time()
    step, running, history = 0, [], []
    while (max_steps is None or step < max_steps) and time.time() - start < budget:
        set_learning_rate(opt, lr, step, (time.time() - start) / budget)
        x0, cond = draw_batch(rng, latents_t, ids, empty_ids, batch, empty_share)
        mask = cond != pad
        longest = int(mask.sum(1).max())  # the batch's longest caption: no compute on shared padding
        context = text_model(cond[:, :longest])
        loss = flow_loss(model, x0, torch.randn(x0.shape, generator=generator), sample_flow_sigmas(batch, generator),
                         context, mask[:, :longest])
        optimise_step(opt, loss, params, ema_params, step)
        step += 1
        log_loss(loss.item(), step, running, history, log_every, start, opt)
        if step % save_every == 0:
            _save_flow(out, ema_model, ema_text, step, start, history, batch, scenes, empty_share, save_llm_weights)
    meta = _save_flow(out, ema_model, ema_text, step, start, history, batch, scenes, empty_share, save_llm_weights)
    print(f"done: {step} steps in {time.time() - start:.0f} s → {out}", flush=True)
    return meta
