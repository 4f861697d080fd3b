"""Stand-ins for the few AUTOMATIC1111 v1.10.1 objects the adapter touches, built on the real ldm
UNet and the real k-diffusion samplers. Attribute names and call shapes mirror v1.10.1:

- prompt_parser.py:136 ScheduledPromptConditioning(end_at_step, cond); :240
  ComposableScheduledPromptConditioning(schedules, weight); :246 MulticondLearnedConditioning(shape, batch)
- sd_samplers_cfg_denoiser.py:156-311 CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale,
  s_min_uncond, image_cond): interrupt check (157), rows [cond rows…] + [uncond rows] (203-205),
  cond dict {"c_crossattn": [t], "c_concat": [t]} (SD1) / {**crossattn+vector, "c_concat"} (SDXL)
  (189-200), one inner_model call or split calls when batch_cond_uncond is off (240-271), step += 1 (310)
- sd_samplers_kdiffusion.py:67-77 KDiffusionSampler (model_wrap_cfg, model_wrap), 80-130
  get_sigmas (the pass's scheduler: p.hr_scheduler in the hires pass), 134-188 sample_img2img,
  190-234 sample; sd_schedulers.py:34-42, 130-144 schedulers; sd_samplers_common.py:22-31
  setup_img2img_steps, 142 InterruptedException(BaseException), 265-281 launch_sampling
- sd_samplers_timesteps.py:11-171 the timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC):
  CompVisTimestepsDenoiser (26-34, ε) / CompVisTimestepsVDenoiser (37-47), CFGDenoiserTimesteps
  (50-71, A1111's CFG forward on ε), CompVisSampler (74-171: uniform timesteps, img2img noising
  to timesteps[t_enc]); the update rules of sd_samplers_timesteps_impl.py (DDIM 10-41, CFG++
  44-80, PLMS 83-131, UniPC's model calls 134-185) re-written here from their formulas
- modules/api/api.py:167-181 handle_exception (status from the exception, no traceback for an
  HTTPException); call_queue.py wrap_gradio_call_no_job (the UI's error text)
- processing.py:1166-1199 / 137-226 StableDiffusionProcessingTxt2Img fields, 1307-1362 sample(),
  1364-1464 sample_hr_pass(), 296 comment(), 299 txt2img_image_conditioning()
- processing.py:1557-1735 StableDiffusionProcessingImg2Img: __post_init__ moves ``mask`` to
  ``image_mask``; init() resizes each init image to width×height (images.resize_image with the
  resize mode), one image repeated over the batch (1720-1729), encodes into init_latent; sample()
  draws x from p.rng and calls sample_img2img(p, init_latent, x, c, uc, image_conditioning), then
  blends with the mask
- sd-webui-controlnet v1.1.455 (scripts/): enums.py:157 ControlModelType, :225 HiResFixOption;
  hook.py:162-243 ControlParams (hint_cond setter clears used_hint_cond, disabled_by_hr_option,
  apply_effective_region_mask), hook.py:472-640 the hooked UNet forward (hint choice by height
  518-534, skips 589-590, soft injection in hires for canny/mlsd 640-650, cldm's ``h += guided_hint``),
  controlnet.py Script.latest_network (1199)
- sd_hijack_clip.py:10-21 PromptChunk(tokens, multipliers, fixes), 81-174 tokenize_line, 346-349
  tokenize; id_start / id_end / id_pad (342-344)
"""

from __future__ import annotations

import math
from collections import namedtuple
from contextlib import nullcontext
from enum import Enum
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from accdiffusion.lab.reference import Host, RowCond

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


class InterruptedException(BaseException):
    pass


class PromptChunk:
    def __init__(self, tokens):
        self.tokens = tokens
        self.multipliers = [1.0] * len(tokens)
        self.fixes = []


class StandInEmbedder:
    """FrozenCLIPEmbedderWithCustomWords-shaped: tokenize_line → 77-token chunks."""

    def __init__(self, host: Host):
        self.host = host
        self.id_start = host.tokenizer.bos_token_id
        self.id_end = self.id_pad = host.tokenizer.eos_token_id

    def tokenize(self, texts):
        return [self.host.tokenize(t) for t in texts]

    def tokenize_line(self, line):
        ids = self.host.context_ids(line)
        return [PromptChunk(ids[i:i + 77]) for i in range(0, len(ids), 77)], len(ids)


class StandInModel:
    """The parts of an ldm LatentDiffusion / sgm DiffusionEngine the adapter and samplers use."""

    def __init__(self, host: Host, sdxl: bool):
        self.host = host
        self.is_sdxl = sdxl
        self.is_sd3 = False
        self.model = SimpleNamespace(diffusion_model=host.unet)
        self.controlnet: UnetHookStandIn | None = None  # set while a ControlNet job runs
        self.alphas_cumprod = host.denoiser.sigmas.new_tensor(
            1 / (1 + host.denoiser.sigmas ** 2))
        embedder = StandInEmbedder(host)
        if sdxl:
            self.conditioner = SimpleNamespace(embedders=[embedder])
        else:
            self.cond_stage_model = embedder

    def encode(self, prompt: str, is_negative: bool = False) -> Any:
        row: RowCond = self.host.encode([prompt])[0]
        if self.is_sdxl:
            return {"crossattn": row.context, "vector": row.vector}
        return row.context

    def apply_model(self, x, t, cond):
        if self.is_sdxl:
            conds = [RowCond(c, v) for c, v in zip(cond["crossattn"], cond["vector"])]
        else:
            conds = [RowCond(c) for c in torch.cat(cond["c_crossattn"], 1)]
        if self.controlnet is None:
            return self.host._eps(x, t, conds)
        control = self.controlnet.control(x)
        if self.controlnet.control_only:  # eps that makes the denoised latent equal the control
            sigma = self.host.denoiser.t_to_sigma(t).view(-1, 1, 1, 1).to(x)
            return (x * (sigma ** 2 + 1) ** 0.5 - control) / sigma
        return self.host._eps(x, t, conds) + control


class CompVisDenoiserStandIn(nn.Module):
    def __init__(self, model: StandInModel):
        super().__init__()
        from k_diffusion.external import CompVisDenoiser, CompVisVDenoiser

        # sd_samplers_kdiffusion.py:61: a v-model (parameterization "v") gets the v wrapper
        v = getattr(model, "parameterization", "eps") == "v"
        self.kd = CompVisVDenoiser(model) if v else CompVisDenoiser(model)

    def forward(self, x, sigma, cond=None):
        return self.kd(x, sigma, cond=cond)

    def sigma_to_t(self, sigma):
        return self.kd.sigma_to_t(sigma)

    def t_to_sigma(self, t):
        return self.kd.t_to_sigma(t)

    @property
    def sigmas(self):
        return self.kd.sigmas

    def get_sigmas(self, n):
        return self.kd.get_sigmas(n)


class CFGDenoiserStandIn(nn.Module):
    def __init__(self, sampler: "KDiffusionSamplerStandIn"):
        super().__init__()
        self.sampler = sampler
        self.step = 0
        self.batch_cond_uncond = True  # shared.opts.batch_cond_uncond
        self.s_min_uncond_all = False  # shared.opts.s_min_uncond_all
        self.cond_scale_miltiplier = 1.0  # :61 (DDIM CFG++ sets it to 1 / 12.5)
        self.need_last_noise_uncond = False  # :63-64 (DDIM CFG++ reads last_noise_uncond)
        self.last_noise_uncond = None

    @property
    def inner_model(self):
        return self.sampler.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        state = self.sampler.webui.state
        if state.interrupted or state.skipped:
            raise InterruptedException
        conds_list, tensor = reconstruct_multicond_batch(cond, self.step)
        uncond = reconstruct_cond_batch(uncond, self.step)
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [image_cond])
        if isinstance(uncond, dict):
            make = lambda c, ic: {**c, "c_concat": [ic]}
        else:
            make = lambda c, ic: {"c_crossattn": [c], "c_concat": [ic]}
        # 236-243: skip the uncond rows (NGMS: every other step below s_min_uncond, or every step)
        skip_uncond = (self.step % 2 or self.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
        text = lambda t: t["crossattn"] if isinstance(t, dict) else t
        if text(tensor).shape[1] == text(uncond).shape[1] or skip_uncond:  # 252-265
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if self.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                                  cond=make(subscript_cond(cond_in, a, b), image_cond_in[a:b]))
        else:  # 266-278: cond and uncond of different token counts
            x_out = torch.zeros_like(x_in)
            step = batch_size * 2 if self.batch_cond_uncond else batch_size
            rows = len(text(tensor))
            for a in range(0, rows, step):
                b = min(a + step, rows)
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                              cond=make(subscript_cond(tensor, a, b), image_cond_in[a:b]))
            if not skip_uncond:
                n = uncond_len(uncond)
                x_out[-n:] = self.inner_model(x_in[-n:], sigma_in[-n:], cond=make(uncond, image_cond_in[-n:]))
        if skip_uncond:  # 280-283: the cond result stands in for the skipped uncond
            x_out = torch.cat([x_out, torch.cat([x_out[c[0][0]:c[0][0] + 1] for c in conds_list])])
        if self.need_last_noise_uncond:  # 281-282
            self.last_noise_uncond = torch.clone(x_out[-batch_size:])
        denoised_uncond = x_out[-batch_size:]
        denoised = torch.clone(denoised_uncond)
        scale = 1.0 if skip_uncond else cond_scale * self.cond_scale_miltiplier  # 284-289
        for i, conds in enumerate(conds_list):
            for row, weight in conds:
                denoised[i] += (x_out[row] - denoised_uncond[i]) * (weight * scale)
        self.step += 1
        return denoised


def catenate_conds(conds):
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def subscript_cond(cond, a, b):
    if isinstance(cond, dict):
        return {k: v[a:b] for k, v in cond.items()}
    return cond[a:b]


def stack_conds(tensors):
    """prompt_parser.stack_conds (307-317): shorter rows padded by repeating their last vector."""
    tokens = max(t.shape[0] for t in tensors)
    return torch.stack([t if t.shape[0] == tokens else torch.vstack([t, t[-1:].repeat(tokens - t.shape[0], 1)])
                        for t in tensors])


def uncond_len(uncond):
    return len(uncond["crossattn"]) if isinstance(uncond, dict) else len(uncond)


def reconstruct_cond_batch(c, step):
    rows = []
    for schedule in c:
        target = next((e for e in schedule if step <= e.end_at_step), schedule[-1])
        rows.append(target.cond)
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return torch.stack(rows)


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, step):
    """prompt_parser.py:321-346: rows of different token counts are padded (stack_conds)."""
    conds_list, flat = [], []
    for subprompts in c.batch:
        entries = []
        for comp in subprompts:
            entries.append((len(flat), comp.weight))
            flat.append(comp.schedules)
        conds_list.append(entries)
    rows = [next((e for e in schedule if step <= e.end_at_step), schedule[-1]).cond for schedule in flat]
    if isinstance(rows[0], dict):
        return conds_list, {k: stack_conds([r[k] for r in rows]) if k == "crossattn" else torch.stack([r[k] for r in rows])
                            for k in rows[0]}
    return conds_list, stack_conds(rows)


class TorchHijack:
    """sd_samplers_common.py:205-226: ancestral samplers' randn_like draws from p.rng."""

    def __init__(self, p):
        self.p = p

    def __getattr__(self, item):
        if item == "randn_like":
            return lambda x: self.p.rng.next().to(x)
        return getattr(torch, item)


class KDiffusionSamplerStandIn:
    def __init__(self, funcname: str, model: StandInModel, webui: "WebUIStandIn"):
        import k_diffusion.sampling

        self.func = getattr(k_diffusion.sampling, funcname)
        self.webui = webui
        self.model_wrap = CompVisDenoiserStandIn(model)
        self.model_wrap_cfg = CFGDenoiserStandIn(self)
        self.last_latent = None

    def callback_state(self, d):
        self.last_latent = d["denoised"]
        self.webui.state.sampling_step = d["i"]
        self.webui.steps_done += 1

    def launch_sampling(self, func):
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def _run(self, p, xi, sigmas, c, uc, image_conditioning):
        import k_diffusion.sampling

        k_diffusion.sampling.torch = TorchHijack(p)  # what Sampler.initialize does (296)
        try:
            self.model_wrap_cfg.step = 0
            extra = {"cond": c, "image_cond": image_conditioning, "uncond": uc, "cond_scale": p.cfg_scale,
                     "s_min_uncond": getattr(p, "s_min_uncond", 0.0)}
            self.last_latent = xi
            return self.launch_sampling(lambda: self.func(self.model_wrap_cfg, xi, sigmas, extra_args=extra,
                                                          disable=True, callback=self.callback_state))
        finally:
            k_diffusion.sampling.torch = torch  # the WebUI leaves it set; the other tests need it back

    def get_sigmas(self, p, steps):
        """sd_samplers_kdiffusion.py:80-130: the scheduler of the pass (``p.hr_scheduler`` while
        ``p.is_hr_pass``, else ``p.scheduler``; Automatic → the sampler's own default), noted in
        the infotext as "Schedule type" / "Hires schedule type"."""
        name = (getattr(p, "hr_scheduler", None) if p.is_hr_pass else getattr(p, "scheduler", None)) or "Automatic"
        if name == "Automatic":
            name = SAMPLER_SCHEDULERS.get(getattr(self, "config_name", None))
        scheduler = SCHEDULERS.get(name)
        if scheduler is None:
            return self.model_wrap.get_sigmas(steps)
        label, function = scheduler
        if not p.is_hr_pass:
            p.extra_generation_params["Schedule type"] = label
        elif label != p.extra_generation_params.get("Schedule type"):
            p.extra_generation_params["Hires schedule type"] = label
        sigma_min, sigma_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
        return function(steps, sigma_min, sigma_max, self.model_wrap).cpu()

    def sample(self, p, x, c, uc, image_conditioning=None):
        sigmas = self.get_sigmas(p, p.steps)
        return self._run(p, x * sigmas[0], sigmas, c, uc, image_conditioning)

    def sample_img2img(self, p, x, noise, c, uc, steps=None, image_conditioning=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        return self._run(p, x + noise * sigma_sched[0], sigma_sched, c, uc, image_conditioning)


def setup_img2img_steps(p, steps=None):
    """sd_samplers_common.py:22-31 (with ``steps`` given, as every hires and AccDiffusion stage
    passes them, or img2img_fix_steps)."""
    requested = steps or p.steps
    return int(requested / min(p.denoising_strength, 0.999)), requested - 1


def sgm_uniform(n, sigma_min, sigma_max, inner_model):
    """sd_schedulers.py:34-42: n steps evenly spaced in the model's timestep, then 0."""
    start, end = inner_model.sigma_to_t(torch.tensor(sigma_max)), inner_model.sigma_to_t(torch.tensor(sigma_min))
    sigmas = [float(inner_model.t_to_sigma(t)) for t in torch.linspace(float(start), float(end), n + 1)[:-1]]
    return torch.tensor(sigmas + [0.0])


def _k_scheduler(name):
    def schedule(n, sigma_min, sigma_max, inner_model):
        import k_diffusion.sampling

        return getattr(k_diffusion.sampling, name)(n, sigma_min, sigma_max)

    return schedule


# sd_schedulers.py:130-144 (by label; the WebUI also accepts the lower-case names)
SCHEDULERS = {"Uniform": ("Uniform", lambda n, lo, hi, inner: inner.get_sigmas(n)),
              "Karras": ("Karras", _k_scheduler("get_sigmas_karras")),
              "Exponential": ("Exponential", _k_scheduler("get_sigmas_exponential")),
              "SGM Uniform": ("SGM Uniform", sgm_uniform)}
SCHEDULERS.update({"uniform": SCHEDULERS["Uniform"], "karras": SCHEDULERS["Karras"],
                   "exponential": SCHEDULERS["Exponential"], "sgm_uniform": SCHEDULERS["SGM Uniform"]})

SAMPLER_FUNCS = {"Euler": "sample_euler", "Euler a": "sample_euler_ancestral",
                 "DPM++ 2M": "sample_dpmpp_2m", "Heun": "sample_heun"}
SAMPLER_SCHEDULERS = {"DPM++ 2M": "karras"}  # sd_samplers_kdiffusion.py:12: the config's default scheduler


# --- timestep samplers: sd_samplers_timesteps.py, sd_samplers_timesteps_impl.py -----------------
class CompVisTimestepsDenoiserStandIn(nn.Module):
    """sd_samplers_timesteps.py:26-34 CompVisTimestepsDenoiser: (x_t, t, cond) → the model's ε."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CompVisTimestepsVDenoiserStandIn(CompVisTimestepsDenoiserStandIn):
    """sd_samplers_timesteps.py:37-47 CompVisTimestepsVDenoiser: a v-model's output as ε =
    √ᾱ_t·v + √(1 − ᾱ_t)·x_t, ᾱ at int(t)."""

    def forward(self, input, timesteps, **kwargs):
        v = self.inner_model.apply_model(input, timesteps, **kwargs)
        abar = self.inner_model.alphas_cumprod.to(input)[timesteps.to(torch.int)].view(-1, 1, 1, 1)
        return abar.sqrt() * v + (1 - abar).sqrt() * input


class CFGDenoiserTimestepsStandIn(CFGDenoiserStandIn):
    """sd_samplers_timesteps.py:50-71 CFGDenoiserTimesteps: A1111's CFG denoiser (the same
    forward, here CFGDenoiserStandIn's) whose inner model takes timesteps and returns ε (the CFG
    mix of ε is the same affine mix as of x₀)."""

    def __init__(self, sampler, model):
        super().__init__(sampler)
        v = getattr(model, "parameterization", "eps") == "v"
        self.model_wrap = (CompVisTimestepsVDenoiserStandIn if v else CompVisTimestepsDenoiserStandIn)(model)

    @property
    def inner_model(self):
        return self.model_wrap


def _alphas(model):
    """``model.inner_model.inner_model.alphas_cumprod`` as the impl functions read it (the CFG
    denoiser → its timestep denoiser → the model), float64."""
    return model.inner_model.inner_model.alphas_cumprod.double().cpu()


def _ddim_like(model, x, timesteps, extra_args, callback, cfgpp):
    """sd_samplers_timesteps_impl.py:10-41 (DDIM) and 44-80 (DDIM CFG++), eta 0: the model is
    called at timesteps[n-1] … timesteps[1] (x_t, t·ones), x̂₀ = (x − √(1 − ᾱ_t)·ε)/√ᾱ_t, then
    x ← √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev)·d with ᾱ_prev at the next lower timestep and d = ε (CFG++: the
    uncond ε, ``model.last_noise_uncond``, with the CFG scale / 12.5). The noise draw of every step
    (× σ_t = 0) is kept: it consumes p's rng as the WebUI's does."""
    import k_diffusion.sampling

    abar = _alphas(model)
    if cfgpp:
        model.cond_scale_miltiplier = 1 / 12.5
        model.need_last_noise_uncond = True
    ones = x.new_ones(x.shape[0])
    for i, index in enumerate(range(len(timesteps) - 1, 0, -1)):
        t, prev = int(timesteps[index]), int(timesteps[index - 1])
        eps = model(x, t * ones, **(extra_args or {}))
        a, a_prev = float(abar[t]), float(abar[prev])
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        direction = model.last_noise_uncond if cfgpp else eps
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * direction + 0.0 * k_diffusion.sampling.torch.randn_like(x)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x0})
    return x


def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None):
    return _ddim_like(model, x, timesteps, extra_args, callback, cfgpp=False)


def ddim_cfgpp(model, x, timesteps, extra_args=None, callback=None, disable=None):
    return _ddim_like(model, x, timesteps, extra_args, callback, cfgpp=True)


def plms(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """sd_samplers_timesteps_impl.py:83-131 PLMS: the first step a pseudo improved Euler (the
    model also at the next lower timestep, on the intermediate latent), then Adams–Bashforth of
    orders 2, 3, 4 over the last ε."""
    abar = _alphas(model)
    ones = x.new_ones(x.shape[0])
    history: list = []

    def update(x, eps, index):
        a, a_prev = float(abar[int(timesteps[index])]), float(abar[int(timesteps[index - 1])])
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps, x0

    for i, index in enumerate(range(len(timesteps) - 1, 0, -1)):
        eps = model(x, int(timesteps[index]) * ones, **(extra_args or {}))
        if not history:
            x_mid, _ = update(x, eps, index)
            eps_next = model(x_mid, int(timesteps[index - 1]) * ones, **(extra_args or {}))
            used = (eps + eps_next) / 2
        elif len(history) == 1:
            used = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            used = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            used = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        x, x0 = update(x, used, index)
        history = (history + [eps])[-3:]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x0})
    return x


def unipc(model, x, timesteps, extra_args=None, callback=None, disable=None, is_img2img=False):
    """sd_samplers_timesteps_impl.py:134-185 with modules/models/diffusion/uni_pc: UniPC's model
    function calls the CFG denoiser at the *fractional* timestep t_in = 1000·(t_c − 1/N) of a
    continuous time t_c ∈ [1/N, 1] and reads its ε on the discrete VP schedule (log α = ½·log ᾱ,
    linear in t_c between the knots (k + 1)/N: NoiseScheduleVP 'discrete'); time-uniform steps
    from 1 (img2img: timesteps[-1]/1000 + 1/1000) down to 1/N, ``len(timesteps)`` of them. This
    stand-in makes UniPC's first-order update (order 1, no corrector: DPM-Solver-1 in x₀ form),
    which calls the model exactly so."""
    abar = _alphas(model)
    n = abar.shape[0]
    knots = torch.arange(1, n + 1, dtype=torch.float64) / n
    log_alpha = 0.5 * abar.log()
    ones = x.new_ones(x.shape[0])

    def marginal(tc):  # (log α, σ, λ) at continuous time tc
        k = int(min(max((tc * n) - 1, 0), n - 2))
        w = (tc - float(knots[k])) * n
        la = (1 - w) * float(log_alpha[k]) + w * float(log_alpha[k + 1])
        sig = (1 - math.exp(2 * la)) ** 0.5
        return la, sig, la - math.log(sig)

    start = float(timesteps[-1]) / 1000 + 1 / 1000 if is_img2img else 1.0
    times = torch.linspace(start, 1 / n, len(timesteps) + 1, dtype=torch.float64).tolist()
    for i, (s, t) in enumerate(zip(times[:-1], times[1:])):
        la_s, sig_s, lam_s = marginal(s)
        eps = model(x, (s - 1 / n) * 1000 * ones, **(extra_args or {}))
        x0 = (x - sig_s * eps) / math.exp(la_s)
        la_t, sig_t, lam_t = marginal(t)
        x = (sig_t / sig_s) * x - math.exp(la_t) * math.expm1(-(lam_t - lam_s)) * x0
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x0})
    return x


TIMESTEP_SAMPLERS = {"DDIM": ddim, "DDIM CFG++": ddim_cfgpp, "PLMS": plms, "UniPC": unipc}


class CompVisSamplerStandIn(KDiffusionSamplerStandIn):
    """sd_samplers_timesteps.py:74-171 CompVisSampler: its CFG denoiser is CFGDenoiserTimesteps;
    uniform timesteps (92-103; schedulers do not apply to these samplers); img2img noises the init
    latent to timesteps[t_enc] as x·√ᾱ + noise·√(1 − ᾱ) and samples over timesteps[:t_enc]
    (105-146); txt2img starts from the noise itself (148-171)."""

    def __init__(self, func, model, webui):
        self.func = func
        self.webui = webui
        self.model = model
        self.model_wrap_cfg = CFGDenoiserTimestepsStandIn(self, model)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.last_latent = None

    def get_timesteps(self, p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def _run_timesteps(self, p, x, timesteps, c, uc, image_conditioning, is_img2img):
        import inspect

        import k_diffusion.sampling

        k_diffusion.sampling.torch = TorchHijack(p)
        try:
            self.model_wrap_cfg.step = 0
            extra = {"cond": c, "image_cond": image_conditioning, "uncond": uc, "cond_scale": p.cfg_scale,
                     "s_min_uncond": getattr(p, "s_min_uncond", 0.0)}
            kwargs = {"is_img2img": True} if is_img2img and "is_img2img" in inspect.signature(self.func).parameters else {}
            self.last_latent = x
            return self.launch_sampling(lambda: self.func(self.model_wrap_cfg, x, timesteps, extra_args=extra,
                                                          callback=self.callback_state, disable=True, **kwargs))
        finally:
            k_diffusion.sampling.torch = torch

    def sample_img2img(self, p, x, noise, c, uc, steps=None, image_conditioning=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        timesteps = self.get_timesteps(p, steps)
        abar = self.model.alphas_cumprod[timesteps[t_enc]].to(x)
        xi = x * abar.sqrt() + noise * (1 - abar).sqrt()
        return self._run_timesteps(p, xi, timesteps[:t_enc], c, uc, image_conditioning, is_img2img=True)

    def sample(self, p, x, c, uc, image_conditioning=None):
        return self._run_timesteps(p, x, self.get_timesteps(p, p.steps), c, uc, image_conditioning, is_img2img=False)


class StarletteHTTPExceptionStandIn(Exception):
    """starlette/exceptions.py HTTPException: status_code, detail, headers; str() is
    "<status>: <detail>"."""

    def __init__(self, status_code, detail=None, headers=None):
        self.status_code, self.detail, self.headers = status_code, detail, headers

    def __str__(self):
        return f"{self.status_code}: {self.detail}"


class HTTPExceptionStandIn(StarletteHTTPExceptionStandIn):
    """fastapi.exceptions.HTTPException (what modules/api/api.py imports and tests with isinstance)."""

    def __init__(self, status_code, detail=None, headers=None):
        super().__init__(status_code=status_code, detail=detail, headers=headers)


def api_handle_exception(e):
    """modules/api/api.py:167-181 handle_exception (A1111 v1.10.1; Forge's is the same): the
    response's status and JSON, and whether it printed a traceback ("API error: ..." through
    errors.report) — only for exceptions that are not an HTTPException."""
    err = {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""),
           "errors": str(e)}
    traceback_printed = not isinstance(e, HTTPExceptionStandIn)
    return vars(e).get("status_code", 500), err, traceback_printed


def gradio_error_message(e):
    """call_queue.py wrap_gradio_call_no_job: what the UI shows for an exception of a generation."""
    return f"{type(e).__name__}: {e}"


class ImageRNGStandIn:
    """rng.ImageRNG: one generator per seed, next() → noise of the given shape per image."""

    def __init__(self, shape, seeds):
        self.shape = tuple(shape)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def next(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


class StateStandIn:
    def __init__(self):
        self.interrupted = self.skipped = False
        self.job_count, self.job_no, self.sampling_step = 2, 0, 0

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0


class WebUIStandIn:
    """``accdiffusion.flows.webui.WebUI``, implemented on the stand-ins."""

    def __init__(self):
        self.state = StateStandIn()
        self.steps_done = 0
        self.encoded: list[str] = []
        self.saved: list[Any] = []
        self.samplers: list[KDiffusionSamplerStandIn] = []

    def autocast(self):
        return nullcontext()

    def create_sampler(self, name, model):
        if name in TIMESTEP_SAMPLERS:
            sampler = CompVisSamplerStandIn(TIMESTEP_SAMPLERS[name], model, self)
        else:
            sampler = KDiffusionSamplerStandIn(SAMPLER_FUNCS[name], model, self)
        sampler.config_name = name  # sd_samplers.py create_sampler: sampler.config
        self.samplers.append(sampler)
        return sampler

    def sampler_kind(self, name):
        from accdiffusion.method.timesteps import KDIFFUSION, TIMESTEPS

        return KDIFFUSION if name in SAMPLER_FUNCS else TIMESTEPS if name in TIMESTEP_SAMPLERS else None

    def refusal(self, message):
        from accdiffusion.flows.webui import refusal_class

        return refusal_class(HTTPExceptionStandIn)(message)

    def image_rng(self, shape, p):
        return ImageRNGStandIn(shape, p.seeds)

    def latent_upscale_mode(self, name):
        return {"Latent": {"mode": "bilinear", "antialias": False}}.get(name)

    def pixel_upscale(self, p, decoded, width, height):
        """A 'pixel upscaler': bicubic on the decoded image, encoded back. images.resize_image
        converts an RGBA image to RGB first (modules/images.py resize_image: alpha dropped)."""
        decoded = decoded[:, :3]
        pixels = torch.nn.functional.interpolate((decoded.float() + 1) / 2, size=(height, width), mode="bicubic")
        return self.encode(p.sd_model, pixels.clamp(0, 1))

    native = 512  # native_side(): tests lower it to make the probe smaller than the image

    def decode(self, model, latent):
        return torch.tanh(torch.nn.functional.interpolate(latent[:, :3].float(), scale_factor=8, mode="nearest"))

    def encode(self, model, pixels, seed=None):
        """A stand-in VAE encoder ([0, 1] pixels → latent), roughly the inverse of decode."""
        if pixels.shape[1] != 3:  # the real VAE's conv_in takes RGB only
            raise RuntimeError(f"VAE encoder: expected 3 channels, got {pixels.shape[1]}")
        self.encodes = getattr(self, "encodes", 0) + 1
        self.encode_seeds = getattr(self, "encode_seeds", []) + [seed]
        x = torch.nn.functional.avg_pool2d(pixels.float() * 2 - 1, 8).clamp(-0.95, 0.95)
        x = torch.atanh(x)
        return torch.cat([x, x.mean(1, keepdim=True) * 0.5], 1)

    def native_side(self, model):
        return self.native

    def probe_image(self, p, image, width, height):
        self.probe_sizes = getattr(self, "probe_sizes", []) + [(width, height)]
        if image.mode == "RGBA":  # images.flatten: composited over img2img_background_color (#ffffff)
            from PIL import Image

            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            background.alpha_composite(image)
            image = background.convert("RGB")
        return pil_to_tensor(resize_image(getattr(p, "resize_mode", 0), image, width, height))

    def decode_batch(self, model, latent):
        return [self.decode(model, latent[i:i + 1])[0] for i in range(latent.shape[0])]

    def decoded_samples(self, images):
        return list(images)

    def learned_conditioning(self, p, prompts, width, height):
        self.encoded.extend(prompts)
        return [[ScheduledPromptConditioning(p.steps, p.sd_model.encode(t))] for t in prompts]

    def final_prompt_variant(self, prompt, steps):
        return prompt

    def text_embedder(self, model):
        return model.conditioner.embedders[0] if model.is_sdxl else model.cond_stage_model

    def sdxl_crop_embedder(self, model):
        return None

    def activate_hr_networks(self, p):
        pass

    def token_merging(self, p, for_hr):
        pass

    def add_progress(self, extra_jobs, extra_steps):
        self.state.job_count += extra_jobs
        self.extra_steps = extra_steps

    def save_image(self, p, image, seed, prompt, info):
        self.saved.append(image)

    def torch_gc(self):
        pass


class Txt2ImgStandIn:
    """StableDiffusionProcessingTxt2Img with the fields and the two sampling methods the adapter
    replaces (a trimmed mirror of processing.py:1307-1464 for a latent upscaler)."""

    def __init__(self, model: StandInModel, webui: WebUIStandIn, prompts, negative="", width=64, height=64,
                 hr_scale=2.0, seed=1, steps=3, hr_steps=2, sampler_name="Euler", hr_prompts=None,
                 denoising_strength=0.6, cfg_scale=5.0):
        self.sd_model, self.webui = model, webui
        self.prompts = list(prompts)
        self.hr_prompts = list(hr_prompts or prompts)
        self.negative_prompts = [negative] * len(prompts)
        self.seeds = [seed + i for i in range(len(prompts))]
        self.subseeds, self.subseed_strength = self.seeds, 0.0
        self.seed_resize_from_h = self.seed_resize_from_w = 0
        self.width, self.height, self.steps, self.hr_second_pass_steps = width, height, steps, hr_steps
        self.firstpass_steps = steps
        self.sampler_name, self.hr_sampler_name = sampler_name, None
        # processing.py:152 / :1178 (init, 1280-1281: no hires scheduler → the first pass's)
        self.scheduler = self.hr_scheduler = None
        self.enable_hr, self.hr_scale, self.hr_upscaler = True, hr_scale, "Latent"
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(width * hr_scale), int(height * hr_scale)
        self.truncate_x = self.truncate_y = 0
        self.latent_scale_mode = {"mode": "bilinear", "antialias": False}
        self.denoising_strength, self.cfg_scale = denoising_strength, cfg_scale
        # init (processing.py:1276-1277, Forge 2 the same): hires jobs write it before sampling
        self.extra_generation_params: dict = {"Denoising strength": denoising_strength}
        self.scripts = None
        self.comments: dict = {}
        self.disable_extra_networks = False
        self.is_hr_pass = False
        self.firstpass_image = None
        self.hr_c = self.hr_uc = None
        self.sampler = None
        self.rng = ImageRNGStandIn((4, height // 8, width // 8), self.seeds)

    def comment(self, text):
        self.comments[text] = 1

    def txt2img_image_conditioning(self, x, width=None, height=None):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def conds(self, prompts, negative: bool = False):
        encoded = [self.sd_model.encode(t) for t in prompts]
        if negative:
            return [[ScheduledPromptConditioning(self.steps, e)] for e in encoded]
        return MulticondLearnedConditioning((len(prompts),), [
            [ComposableScheduledPromptConditioning([ScheduledPromptConditioning(self.steps, e)])] for e in encoded])

    def calculate_hr_conds(self):
        if self.hr_c is None:
            self.hr_c = self.conds(self.hr_prompts)
            self.hr_uc = self.conds(self.negative_prompts, negative=True)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = self.webui.create_sampler(self.sampler_name, self.sd_model)
        if self.firstpass_image is not None and self.enable_hr:  # the Upscale button (processing.py:1310-1329)
            # np.array(self.firstpass_image): all its channels, an alpha one too (processing.py:1313-1326)
            image = pil_to_tensor(self.firstpass_image, keep_alpha=True)[None]
            if self.latent_scale_mode is None:
                return self.sample_hr_pass(None, image * 2 - 1, seeds, subseeds, subseed_strength, prompts)
            samples = self.webui.encode(self.sd_model, image)
            return self.sample_hr_pass(samples, None, seeds, subseeds, subseed_strength, prompts)
        x = self.rng.next()
        if self.scripts is not None:  # processing.py:1337-1344
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        self.first_pass_latent = samples
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples, None, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        self.is_hr_pass = True
        target = (self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8)
        self.sampler = self.webui.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        if samples is None:  # pixel upscaler
            samples = self.webui.pixel_upscale(self, decoded_samples, target[1] * 8, target[0] * 8)
        else:
            samples = torch.nn.functional.interpolate(samples, size=target, mode="bilinear")
        self.webui.state.nextjob()
        self.rng = ImageRNGStandIn(samples.shape[1:], self.seeds)
        noise = self.rng.next()
        self.calculate_hr_conds()
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=self.txt2img_image_conditioning(samples))
        self.is_hr_pass = False
        return self.webui.decode_batch(self.sd_model, samples)


def resize_image(mode, image, width, height):
    """images.resize_image for modes 0 (stretch) and 1 (crop to fill), without an upscaler."""
    from PIL import Image

    if mode == 1:
        ratio = max(width / image.width, height / image.height)
        w, h = round(image.width * ratio), round(image.height * ratio)
        resized = image.resize((w, h), Image.LANCZOS)
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    return image.resize((width, height), Image.LANCZOS)


def pil_to_tensor(image, keep_alpha=False):
    import numpy as np

    image = image if keep_alpha and image.mode == "RGBA" else image.convert("RGB")
    return torch.from_numpy(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))


def picture(width, height, seed=0):
    """A picture with structure (a bright disc on a gradient), so latents and maps are not flat."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < (0.25 * min(width, height)) ** 2).astype(np.float32)
    rgb = np.stack([xx / width, yy / height, disc], -1) * 0.8 + 0.1 + rng.normal(0, 0.03, (height, width, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


class Img2ImgStandIn:
    """StableDiffusionProcessingImg2Img: the fields the flow reads, init() and sample() as in
    processing.py:1598-1735 (no inpainting fill, no color correction)."""

    def __init__(self, model: StandInModel, webui: WebUIStandIn, prompts, init_images, negative="", width=128,
                 height=128, seed=1, steps=3, sampler_name="Euler", denoising_strength=0.5, cfg_scale=5.0,
                 resize_mode=0, mask=None, initial_noise_multiplier=1.0):
        self.sd_model, self.webui = model, webui
        self.initial_noise_multiplier = initial_noise_multiplier  # __post_init__ resolves None from opts
        self.prompts = list(prompts)
        self.batch_size = len(prompts)
        self.init_images = list(init_images)
        self.negative_prompts = [negative] * len(prompts)
        self.seeds = [seed + i for i in range(len(prompts))]
        self.subseeds, self.subseed_strength = self.seeds, 0.0
        self.seed_resize_from_h = self.seed_resize_from_w = 0
        self.width, self.height, self.steps, self.firstpass_steps = width, height, steps, steps
        self.sampler_name, self.resize_mode = sampler_name, resize_mode
        self.scheduler = None  # processing.py:152
        self.denoising_strength, self.cfg_scale = denoising_strength, cfg_scale
        self.image_mask, self.mask = mask, None  # __post_init__ (processing.py:1584-1587)
        self.extra_generation_params: dict = {}
        self.scripts = None
        self.comments: dict = {}
        self.is_hr_pass = False
        self.sampler = self.init_latent = self.image_conditioning = None
        self.rng = None

    def comment(self, text):
        self.comments[text] = 1

    def txt2img_image_conditioning(self, x, width=None, height=None):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    conds = Txt2ImgStandIn.conds

    def init(self, all_prompts=None, all_seeds=None, all_subseeds=None):
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        self.sampler = self.webui.create_sampler(self.sampler_name, self.sd_model)
        images = [pil_to_tensor(resize_image(self.resize_mode, im, self.width, self.height)) for im in self.init_images]
        if len(images) == 1:
            batch = images[0][None].repeat(self.batch_size, 1, 1, 1)
        else:
            self.batch_size = len(images)
            batch = torch.stack(images)
        self.init_latent = self.webui.encode(self.sd_model, batch)
        if self.image_mask is not None:
            self.mask = torch.ones_like(self.init_latent[:, :1])
            self.nmask = 1 - self.mask
        self.image_conditioning = self.txt2img_image_conditioning(self.init_latent)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.rng.next()
        if self.initial_noise_multiplier != 1.0:  # processing.py:1762-1764
            self.extra_generation_params["Noise multiplier"] = self.initial_noise_multiplier
            x *= self.initial_noise_multiplier
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.image_conditioning)
        if self.mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        return samples


def process_img2img(p: Img2ImgStandIn, settings, adapter, n_iter: int = 1,
                    parse_prompts: Callable[[Any, int], None] | None = None) -> SimpleNamespace:
    """process_images_inner for img2img: script process (915) → p.init (921) → per batch: rng
    (948), ``parse_prompts(p, n)`` (the batch's extra networks, 958-961), conds,
    before_process_batch (952), p.sample (988), decode unless already decoded (995-1002) →
    postprocess."""
    if settings is not None:
        adapter.start_job(p, settings, webui=p.webui)
    p.init()
    images = []
    seeds = list(p.seeds)
    for n in range(n_iter):
        p.seeds = [s + n * len(seeds) for s in seeds]
        p.rng = ImageRNGStandIn(p.init_latent.shape[1:], p.seeds)
        if parse_prompts is not None:
            parse_prompts(p, n)
        c = p.conds(p.prompts)
        uc = p.conds(p.negative_prompts, negative=True)
        adapter.before_batch(p)
        with torch.no_grad():
            out = p.sample(conditioning=c, unconditional_conditioning=uc, seeds=p.seeds, subseeds=p.subseeds,
                           subseed_strength=p.subseed_strength, prompts=p.prompts)
        images += list(out) if not isinstance(out, torch.Tensor) else p.webui.decode_batch(p.sd_model, out)
    processed = SimpleNamespace(images=images, infotexts=["info"] * len(images))
    adapter.finish_job(p, processed)
    return processed


def assert_hooks_removed(p, model, webui) -> None:
    """Every hook the extension installs is gone after the job: attention forwards, sampler
    wrappers, p.sample / sample_hr_pass, the job attribute and, on Forge, its model options."""
    from accdiffusion.method.attention import find_cross_attention
    from accdiffusion.flows.job import JOB_ATTR

    assert all("forward" not in m.__dict__ for m in find_cross_attention(model.host.unet))
    for sampler in webui.samplers:
        assert "forward" not in sampler.model_wrap_cfg.__dict__
        assert "forward" not in sampler.model_wrap.__dict__
    assert "sample" not in p.__dict__ and "sample_hr_pass" not in p.__dict__
    assert not hasattr(p, JOB_ATTR)
    if hasattr(model, "forge_objects"):
        assert model.forge_objects.unet.model_options.get("model_function_wrapper") is None
        assert "patches_replace" not in model.forge_objects.unet.model_options["transformer_options"]


def process_images(p: Txt2ImgStandIn, settings, adapter) -> SimpleNamespace:
    """processing.process_images_inner's order for one batch: script process (915) → conds (966) →
    before_process_batch (952) → p.sample (988) → postprocess (1147)."""
    if p.scripts is None:
        p.scripts = ScriptsStandIn(adapter=adapter)
    elif getattr(p.scripts, "adapter", False) is None:
        p.scripts.adapter = adapter
    if settings is not None:
        adapter.start_job(p, settings, webui=p.webui)
    c = p.conds(p.prompts)
    uc = p.conds(p.negative_prompts, negative=True)
    adapter.before_batch(p)
    with torch.no_grad():
        images = p.sample(conditioning=c, unconditional_conditioning=uc, seeds=p.seeds, subseeds=p.subseeds,
                          subseed_strength=p.subseed_strength, prompts=p.prompts)
    processed = SimpleNamespace(images=list(images), infotexts=["info"] * len(images))
    adapter.finish_job(p, processed)
    return processed


# --- sd-webui-controlnet v1.1.455 ------------------------------------------------------------------
class HiResFixOption(Enum):
    BOTH = "Both"
    LOW_RES_ONLY = "Low res only"
    HIGH_RES_ONLY = "High res only"


class ControlModelType(Enum):
    ControlNet = "ControlNet, Lvmin Zhang"
    T2I_Adapter = "T2I_Adapter, Chong Mou"
    AttentionInjection = "AttentionInjection, Lvmin Zhang"
    IPAdapter = "IPAdapter, Hu Ye"


class ControlParamsStandIn:
    """hook.py:162 ControlParams (the fields the forward reads)."""

    def __init__(self, hint_cond, hr_hint_cond, weight=1.0, module="none", hr_option=HiResFixOption.BOTH,
                 control_model_type=ControlModelType.ControlNet, effective_region_mask=None, soft_injection=False):
        self.control_model = SimpleNamespace()
        self.preprocessor = {"name": module, "threshold_a": 0.5}
        self._hint_cond = hint_cond
        self.hr_hint_cond = hr_hint_cond
        self.weight = weight
        self.guidance_stopped = False
        self.start_guidance_percent, self.stop_guidance_percent = 0.0, 1.0
        self.advanced_weighting = None
        self.control_model_type = control_model_type
        self.hr_option = hr_option
        self.effective_region_mask = effective_region_mask
        self.soft_injection = soft_injection
        self.used_hint_cond = None

    @property
    def hint_cond(self):
        return self._hint_cond

    @hint_cond.setter
    def hint_cond(self, value):
        self._hint_cond = value
        self.used_hint_cond = None

    def disabled_by_hr_option(self, is_in_high_res_fix):
        if self.hr_option == HiResFixOption.LOW_RES_ONLY:
            return is_in_high_res_fix
        if self.hr_option == HiResFixOption.HIGH_RES_ONLY:
            return not is_in_high_res_fix
        return False

    def apply_effective_region_mask(self, out):
        if self.effective_region_mask is None:
            return out
        mask = torch.nn.functional.interpolate(self.effective_region_mask.to(out), size=out.shape[-2:],
                                               mode="bilinear")
        return out * mask


class UnetHookStandIn:
    """hook.py:377 UnetHook's forward, for the control it adds: the "ControlNet" paints the block
    means of its hint's first channel (× weight, × the hires soft-injection factor for canny and mlsd)
    so a test sees which pixels each item got. ``calls`` records (x shape, is_in_high_res_fix,
    [(unit, hint shape) of the units that ran])."""

    def __init__(self, control_params, control_only=False):
        self.control_params = control_params
        self.control_only = control_only
        self.is_in_high_res_fix = False
        self.calls: list = []

    def control(self, x):
        is_in_high_res_fix = False
        for param in self.control_params:  # hook.py:518-534
            if param.used_hint_cond is None:
                param.used_hint_cond = param.hint_cond
            if isinstance(param.hr_hint_cond, torch.Tensor) and param.hint_cond.ndim == 4 and param.hr_hint_cond.ndim == 4:
                h = x.shape[2] * 8
                if abs(h - param.hint_cond.shape[2]) < abs(h - param.hr_hint_cond.shape[2]):
                    param.used_hint_cond = param.hint_cond
                else:
                    is_in_high_res_fix = True
                    param.used_hint_cond = param.hr_hint_cond
        self.is_in_high_res_fix = is_in_high_res_fix
        total = x.new_zeros(x.shape)
        ran = []
        for index, param in enumerate(self.control_params):
            if param.guidance_stopped or param.disabled_by_hr_option(is_in_high_res_fix):
                continue
            if param.control_model_type not in (ControlModelType.ControlNet, ControlModelType.T2I_Adapter):
                continue
            hint = param.used_hint_cond
            guided = torch.nn.functional.avg_pool2d(hint[:, :1].to(x), 8)  # the hint block
            if guided.shape[0] not in (1, x.shape[0]) or guided.shape[-2:] != x.shape[-2:]:
                raise RuntimeError(f"The size of tensor a ({x.shape[-1]}) must match the size of tensor b "
                                   f"({guided.shape[-1]}) at non-singleton dimension 3")  # cldm.py h += guided_hint
            scale = param.weight
            if is_in_high_res_fix and any(k in param.preprocessor["name"] for k in ("canny", "mlsd")):
                scale *= 0.825 ** 12  # the softest of hook.py's soft-injection scales
            total = total + param.apply_effective_region_mask(guided * scale).expand_as(x)
            ran.append((index, tuple(hint.shape)))
        self.calls.append((tuple(x.shape), is_in_high_res_fix, ran))
        return total


class ControlNetScriptStandIn:
    def __init__(self, network):
        self.latest_network = network

    def title(self):
        return "ControlNet"


class ScriptsStandIn:
    """modules.scripts.ScriptRunner: the always-on scripts and the two callbacks the pass calls;
    ``process_before_every_sampling`` reaches our script (the adapter), and ``calls`` logs it as
    ``p.is_hr_pass``."""

    def __init__(self, *scripts, adapter=None):
        self.alwayson_scripts = list(scripts)
        self.adapter = adapter
        self.calls: list[bool] = []

    def process_before_every_sampling(self, p, **kwargs):
        self.calls.append(p.is_hr_pass)
        if self.adapter is not None:
            self.adapter.before_sampling(p)

    def before_hr(self, p):
        pass


def attach_controlnet(p, params, control_only=False) -> UnetHookStandIn:
    """What ControlNet's Script does for a job: a UnetHook on the UNet, found through its script."""
    network = UnetHookStandIn(params, control_only)
    p.sd_model.controlnet = network
    p.scripts = ScriptsStandIn(SimpleNamespace(title=lambda: "Tiled VAE"), ControlNetScriptStandIn(network))
    return network
