"""Stand-ins for the Forge 2 objects the adapter touches (lllyasviel/stable-diffusion-webui-forge
main, commit dfdcbab6), on the real ldm UNet and k-diffusion samplers, sharing the A1111
stand-ins where Forge kept A1111's code (processing, prompt_parser, samplers' k-diffusion loop).

Mirrored:
- backend/patcher/base.py:79 clone (model_options deep-copied, :83), :146
  set_model_unet_function_wrapper, :167-180 set_model_attn2_replace → transformer_options
  ["patches_replace"]["attn2"][(block, number, index)], :197 add_object_patch; unet.py:121
  set_memory_peak_estimation_modifier
- backend/sampling/sampling_function.py:154-290 calc_cond_uncond_batch: one chunk per cond entry,
  order reversed to [uncond, cond] (:187), memory_required(input_shape=...) asked per step
  (:208-213), transformer_options with cond_or_uncond / sigmas / cond_mark / cond_indices
  (:253-259), the wrapper called as wrapper(apply_model, {"input", "timestep", "c",
  "cond_or_uncond"}) (:270-271)
- backend/modules/k_model.py:25-46 apply_model(x, t=sigma, c_crossattn=, y=, transformer_options=)
  → denoised
- backend/nn/unet.py:254-265: an attn2 replace patch gets to_q(n), to_k(ctx), to_v(ctx) and
  extra_options (n_heads, dim_head, block, cond_or_uncond, ...), its result goes through to_out
- backend/patcher/controlnet.py:175-339 ControlBase / ControlNet.get_control (timestep_range skip,
  cond_hint re-cut from cond_hint_original unless it has x's size ×8, broadcast_image_to, mask
  weighting) and sampling_function.py:261-268 (the head's get_control on the full batch → c["control"],
  c["control_model"]); the UnetPatcher's controlnet_linked_list
- backend/diffusion_engine/base.py:7-20 ForgeObjects.shallow_copy; processing.py:1373/:1518 reset
  of forge_objects before sampling; k_diffusion/external.py:41-73 ForgeScheduleLinker (sigma_to_t
  = the predictor's timestep), backend/modules/k_prediction.py:113-170 Prediction
- the timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC): modules/sd_samplers_timesteps.py:28-47
  (CompVisTimestepsDenoiser sets alphas_cumprod from the predictor; CFGDenoiserTimesteps with
  classic_ddim_eps_estimation) and sd_samplers_cfg_denoiser.py:163-169, :199-202, :224-226 (x_t, t
  converted to x, σ before the sampling function, ε after); the update rules as on A1111
"""

from __future__ import annotations

import copy
import math
import sys
import types

import torch
from torch import nn

from accdiffusion.lab.reference import RowCond

from a1111_standins import (CFGDenoiserStandIn, CompVisSamplerStandIn, Img2ImgStandIn, KDiffusionSamplerStandIn,
                            StandInEmbedder, StandInModel, Txt2ImgStandIn, WebUIStandIn, reconstruct_cond_batch,
                            reconstruct_multicond_batch, InterruptedException)


def attention_function(q, k, v, heads, mask=None):
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, -1) @ v
    return out.transpose(1, 2).reshape(b, n, inner)


def install_backend_module() -> None:
    """``backend.nn.unet.attention_function``, which the adapter's recording patch returns through,
    and ``backend.sampling.sampling_function.sampling_prepare / sampling_cleanup`` (:366, :402),
    which record their calls and run every ControlNet's ``pre_run`` / ``cleanup``."""
    if "backend.nn.unet" in sys.modules:
        return
    names = ("backend", "backend.nn", "backend.nn.unet", "backend.sampling", "backend.sampling.sampling_function",
             "backend.memory_management")
    backend, nn_mod, unet_mod, sampling, sampling_function_mod, memory = (types.ModuleType(n) for n in names)
    unet_mod.attention_function = attention_function
    # memory_management.py:1008 get_free_memory(dev=None, torch_free_too=False); tests set ``free``
    memory.free, memory.asked = 8 * 2**30, []
    memory.get_free_memory = lambda dev=None, torch_free_too=False: memory.asked.append(dev) or memory.free
    backend.memory_management = memory
    sampling_function_mod.calls = []

    def chain(unet):  # unet.py:73 list_controlnets
        node, out = unet.controlnet_linked_list, []
        while node is not None:
            out.append(node)
            node = node.previous_controlnet
        return out

    def sampling_prepare(unet, x):  # :366-399: loads the models, pre_run on every ControlNet
        sampling_function_mod.calls.append("prepare")
        for cnet in chain(unet):
            cnet.pre_run()

    def sampling_cleanup(unet):  # :402-408: cleanup on every ControlNet (drops its cond_hint)
        sampling_function_mod.calls.append("cleanup")
        for cnet in chain(unet):
            cnet.cleanup()

    sampling_function_mod.sampling_prepare = sampling_prepare
    sampling_function_mod.sampling_cleanup = sampling_cleanup
    backend.nn, nn_mod.unet = nn_mod, unet_mod
    backend.sampling, sampling.sampling_function = sampling, sampling_function_mod
    sys.modules.update(dict(zip(names, (backend, nn_mod, unet_mod, sampling, sampling_function_mod, memory))))


class PredictionStandIn:
    """backend/modules/k_prediction.py:113-170 Prediction: the schedule's sigmas (one per
    timestep), ``timestep(σ)`` = the nearest timestep in log σ (a whole one), ``sigma(t)``
    interpolated in log σ."""

    def __init__(self, sigmas, prediction_type="epsilon", sigma_data=1.0):
        self.sigmas = sigmas.float()
        self.log_sigmas = self.sigmas.log()
        self.prediction_type, self.sigma_data = prediction_type, sigma_data

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)


class KModelStandIn(nn.Module):
    def __init__(self, model: StandInModel):
        super().__init__()
        from k_diffusion.external import CompVisDenoiser

        self.host = model.host
        self.diffusion_model = model.host.unet
        self.kd = CompVisDenoiser(model)
        self.memory_calls: list = []
        self.control_calls: list = []
        # k_prediction.py:113 Prediction (tests set prediction_type "v_prediction" for a v-model flag)
        self.predictor = PredictionStandIn(self.kd.sigmas)

    def memory_required(self, input_shape):
        self.memory_calls.append(list(input_shape))
        return 0

    control_only = False  # tests: the denoised output is the control itself

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, y=None,
                    control_model=None):
        if control is not None:
            self.control_calls.append((tuple(x.shape), tuple(control["middle"][0].shape)))
            if self.control_only:
                return control["middle"][0].expand_as(x).clone()
        return self._apply_model(x, t, c_concat, c_crossattn, transformer_options, y) + (
            0 if control is None else control["middle"][0])

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, transformer_options={}, y=None):
        patches = transformer_options.get("patches_replace", {}).get("attn2", {})
        conds = [RowCond(c, None if y is None else v) for c, v in zip(c_crossattn, y if y is not None else c_crossattn)]
        restore = []
        for name, module in self.diffusion_model.named_modules():  # unet.py:254-265
            if name.split(".")[-1] != "attn2":
                continue
            parts = name.split(".")
            key = ({"input_blocks": "input", "output_blocks": "output"}.get(parts[0], "middle"),
                   int(parts[1]) if parts[0] != "middle_block" else 0,
                   int(parts[parts.index("transformer_blocks") + 1]))
            if key in patches:
                def forward(x_, context=None, _m=module, _fn=patches[key], **kw):
                    extra = {**transformer_options, "n_heads": _m.heads, "block": key[:2], "block_index": key[2]}
                    return _m.to_out(_fn(_m.to_q(x_), _m.to_k(context), _m.to_v(context), extra))
                module.forward = forward
                restore.append(module)
        try:
            return self.kd(x, t, cond=conds)
        finally:
            for module in restore:
                del module.forward


class UnetPatcherStandIn:
    def __init__(self, kmodel: KModelStandIn):
        self.model = kmodel
        self.model_options = {"transformer_options": {}}
        self.object_patches = {}
        self.controlnet_linked_list = None

    def clone(self):
        n = type(self)(self.model)  # a subclass (tests/oldforge_standins.py) clones to its own kind
        n.model_options = copy.deepcopy(self.model_options)
        n.object_patches = dict(self.object_patches)
        n.controlnet_linked_list = self.controlnet_linked_list
        return n

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault("attn2", {})[(block_name, number, transformer_index)] = patch

    def set_memory_peak_estimation_modifier(self, fn):
        self.model_options["memory_peak_estimation_modifier"] = fn

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def memory_required(self, input_shape):
        return self.object_patches.get("memory_required", self.model.memory_required)(input_shape=input_shape)


class ForgeObjects:
    def __init__(self, unet, vae=None):
        self.unet, self.vae = unet, vae

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.vae)


class ForgeModelStandIn(StandInModel):
    """ForgeDiffusionEngine: no .model / .cond_stage_model; forge_objects; engine flags."""

    def __init__(self, host, sdxl: bool):
        super().__init__(host, sdxl)
        del self.model
        self.is_sd1, self.is_sd2 = not sdxl, False
        self.conditioner = None
        self.cond_stage_model = None
        if sdxl:
            self.text_processing_engine_l = StandInEmbedder(host)
        else:
            self.text_processing_engine = StandInEmbedder(host)
        self.kmodel = KModelStandIn(self)
        self.forge_objects_after_applying_lora = ForgeObjects(UnetPatcherStandIn(self.kmodel))
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()

    def apply_model(self, x, t, cond):  # the eps call of the k-diffusion wrapper in KModelStandIn
        return self.host._eps(x, t, cond)


def concat_crossattn(conds):
    """condition.py:59-72 ConditionCrossAttn.concat: token counts brought to their lcm by repeating
    each conditioning whole; one already that long is left as it is (Neo condition.py:60-73: so
    Anima's [B, 1, 512, D] rows, 4-d, are concatenated untouched)."""
    tokens = 1
    for c in conds:
        tokens = tokens * c.shape[1] // math.gcd(tokens, c.shape[1])
    return torch.cat([c if c.shape[1] == tokens else c.repeat(1, tokens // c.shape[1], 1) for c in conds])


def sampling_function(model: ForgeModelStandIn, x, sigma, cond, uncond, cond_scale, return_full=False):
    """calc_cond_uncond_batch + CFG for plain prompts: chunks [uncond, cond] of B rows each
    (``return_full``: also the cond and uncond predictions, sampling_function.py:319-320)."""
    unet = model.forge_objects.unet  # re-read on every call (sampling_function.py:326)
    options = unet.model_options
    b = x.shape[0]
    entries = [(cond, 0)] + ([(uncond, 1)] if uncond is not None else [])
    entries.reverse()  # sampling_function.py:187
    unet.memory_required([len(entries) * b, *x.shape[1:]])
    cond_or_uncond = [kind for _, kind in entries]
    text = lambda e: e["crossattn"] if isinstance(e, dict) else e
    c = {"c_crossattn": concat_crossattn([text(e) for e, _ in entries])}
    if isinstance(cond, dict):
        c["y"] = torch.cat([e["vector"] for e, _ in entries])
    topts = dict(options["transformer_options"])
    topts["cond_or_uncond"] = cond_or_uncond
    topts["sigmas"] = sigma
    topts["cond_indices"] = [i * b + j for i, k in enumerate(cond_or_uncond) if k == 0 for j in range(b)]
    topts["uncond_indices"] = [i * b + j for i, k in enumerate(cond_or_uncond) if k == 1 for j in range(b)]
    c["transformer_options"] = topts
    x_in, t_in = torch.cat([x] * len(entries)), torch.cat([sigma] * len(entries))
    if unet.controlnet_linked_list is not None:  # sampling_function.py:261-268
        node = unet.controlnet_linked_list
        while node is not None:
            node.transformer_options = topts
            node = node.previous_controlnet
        c["control"] = unet.controlnet_linked_list.get_control(x_in, t_in, dict(c), len(entries))
        c["control_model"] = unet.controlnet_linked_list
    if "model_function_wrapper" in options:
        out = options["model_function_wrapper"](model.kmodel.apply_model, {"input": x_in, "timestep": t_in, "c": c,
                                                                          "cond_or_uncond": cond_or_uncond})
    else:
        out = model.kmodel.apply_model(x_in, t_in, **c)
    chunks = dict(zip(cond_or_uncond, out.chunk(len(entries))))
    result = chunks[0] if 1 not in chunks else chunks[1] + (chunks[0] - chunks[1]) * cond_scale
    return (result, chunks[0], chunks.get(1)) if return_full else result


class ForgeCFGDenoiserStandIn(CFGDenoiserStandIn):
    """Same prologue as A1111's (sd_samplers_cfg_denoiser.py:156-176), then sampling_function."""

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        state = self.sampler.webui.state
        if state.interrupted or state.skipped:
            raise InterruptedException
        _, cond_t = reconstruct_multicond_batch(cond, self.step)
        uncond_t = reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        out = sampling_function(self.sampler.model, x, sigma, cond_t, uncond_t, cond_scale)
        self.step += 1
        return out


class ForgeScheduleLinkerStandIn(nn.Module):
    """k_diffusion/external.py ForgeScheduleLinker: the predictor's schedule (σ → t: its nearest
    whole timestep)."""

    def __init__(self, kmodel):
        super().__init__()
        # old Forge (tests/oldforge_standins.py): the same schedule from its model_sampling
        self.predictor = getattr(kmodel, "model_sampling", None) or kmodel.predictor

    def sigma_to_t(self, sigma):
        return self.predictor.timestep(sigma)

    def t_to_sigma(self, t):
        return self.predictor.sigma(t)

    @property
    def sigmas(self):
        return self.predictor.sigmas

    def get_sigmas(self, n):
        import k_diffusion.sampling

        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return k_diffusion.sampling.append_zero(self.t_to_sigma(t))


class ForgeSamplerStandIn(KDiffusionSamplerStandIn):
    def __init__(self, funcname, model, webui):
        super().__init__(funcname, model, webui)
        self.model = model
        self.model_wrap = ForgeScheduleLinkerStandIn(model.kmodel)
        self.model_wrap_cfg = ForgeCFGDenoiserStandIn(self)


# --- timestep samplers: Forge's sd_samplers_timesteps.py and the CFG denoiser's conversion ---------
class ForgeCompVisTimestepsDenoiserStandIn(nn.Module):
    """sd_samplers_timesteps.py:28-35 CompVisTimestepsDenoiser: sets the model's alphas_cumprod to
    1/(σ² + 1) of the predictor's sigmas (Forge's CFG denoiser never calls its forward)."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        model.alphas_cumprod = 1.0 / (model.forge_objects.unet.model.predictor.sigmas ** 2.0 + 1.0)

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class ForgeCFGDenoiserTimestepsStandIn(ForgeCFGDenoiserStandIn):
    """sd_samplers_timesteps.py:38-47 CFGDenoiserTimesteps (classic_ddim_eps_estimation) in
    sd_samplers_cfg_denoiser.py:156-228: x_t and t come in and are converted to σ = σ[round(t)] of
    ᾱ and x = x_t·√(σ² + 1) (:163-169), the sampling function runs on them (the UNet wrapper sees
    σ), ε = (x − denoised)/σ goes out (:224-226); DDIM CFG++'s ``last_noise_uncond`` is
    (x − uncond_pred)/σ (:201-202). Forge's forward has no CFG-scale multiplier."""

    def __init__(self, sampler, model):
        super().__init__(sampler)
        self.model_wrap = ForgeCompVisTimestepsDenoiserStandIn(model)
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None

    @property
    def inner_model(self):
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        state = self.sampler.webui.state
        if state.interrupted or state.skipped:
            raise InterruptedException
        acd = self.inner_model.inner_model.alphas_cumprod
        fake_sigmas = ((1 - acd) / acd) ** 0.5
        real_sigma = fake_sigmas[sigma.round().long().clip(0, int(fake_sigmas.shape[0]))]
        x = x * ((real_sigma ** 2.0 + 1.0) ** 0.5)[:, None, None, None]
        sigma = real_sigma
        _, cond_t = reconstruct_multicond_batch(cond, self.step)
        uncond_t = reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        denoised, _, uncond_pred = sampling_function(self.sampler.model, x, sigma, cond_t, uncond_t, cond_scale,
                                                     return_full=True)
        if self.need_last_noise_uncond:
            self.last_noise_uncond = (x - uncond_pred) / sigma[:, None, None, None]
        self.step += 1
        return (x - denoised) / sigma[:, None, None, None]


class ForgeCompVisSamplerStandIn(CompVisSamplerStandIn):
    def __init__(self, func, model, webui):
        self.func, self.webui, self.model = func, webui, model
        self.model_wrap_cfg = ForgeCFGDenoiserTimestepsStandIn(self, model)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.last_latent = None


class ForgeWebUIStandIn(WebUIStandIn):
    def create_sampler(self, name, model):
        from a1111_standins import SAMPLER_FUNCS, TIMESTEP_SAMPLERS

        if name in TIMESTEP_SAMPLERS:
            sampler = ForgeCompVisSamplerStandIn(TIMESTEP_SAMPLERS[name], model, self)
        else:
            sampler = ForgeSamplerStandIn(SAMPLER_FUNCS[name], model, self)
        sampler.config_name = name
        self.samplers.append(sampler)
        return sampler

    def text_embedder(self, model):
        return getattr(model, "text_processing_engine_l", None) or model.text_processing_engine


class ForgeTxt2ImgStandIn(Txt2ImgStandIn):
    """Forge's sample(): forge_objects reset, then process_before_every_sampling (processing.py:1373-1377)."""

    def __init__(self, *args, adapter=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter = adapter

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        # Forge may call the hook twice per pass (it must be idempotent): once here, once in sample()
        self.scripts.process_before_every_sampling(p=self)
        return super().sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts)


# --- ControlNet (backend/patcher/controlnet.py) ------------------------------------------------------
def broadcast_image_to(tensor, target_batch_size, batched_number):  # controlnet.py:153
    if tensor.shape[0] == 1:
        return tensor
    per_batch = target_batch_size // batched_number
    tensor = tensor[:per_batch]
    if per_batch > tensor.shape[0]:
        tensor = torch.cat([tensor] * (per_batch // tensor.shape[0]) + [tensor[:(per_batch % tensor.shape[0])]], dim=0)
    return tensor if tensor.shape[0] == target_batch_size else torch.cat([tensor] * batched_number, dim=0)


class ControlNet:
    """controlnet.py:282 ControlNet (named like Forge's class: the adapter tiles by class name).
    The "model" paints the block means of its hint's first channel (× strength, × mask) into
    control["middle"], so tests see which pixels each item got. ``calls`` records hint shapes,
    ``seen`` what each evaluation was called with. ``soft`` = (positive, negative) weights the rows
    by ``transformer_options["cond_mark"]`` as compute_controlnet_weighting (:86-150) does for the
    control modes (a cond_mark of another row count fails to broadcast, as in Forge)."""

    def __init__(self, hint, strength=1.0, start_percent_t=math.inf, end_percent_t=-math.inf, mask=None, soft=None):
        self.cond_hint_original = hint
        self.soft = soft
        self.seen: list = []
        self.pre_runs = self.cleanups = 0
        self.cond_hint = None
        self.strength = strength
        self.timestep_range = (start_percent_t, end_percent_t)
        self.advanced_mask_weighting = mask
        self.previous_controlnet = None
        self.transformer_options = {}
        self.control_model = types.SimpleNamespace(dtype=torch.float32)
        self.manual_cast_dtype = None
        self.calls: list = []

    def get_control(self, x_noisy, t, cond, batched_number):
        prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number) if self.previous_controlnet else None
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return prev
        if self.cond_hint is None or x_noisy.shape[2] * 8 != self.cond_hint.shape[2] or x_noisy.shape[3] * 8 != self.cond_hint.shape[3]:
            self.cond_hint = torch.nn.functional.interpolate(self.cond_hint_original, size=(x_noisy.shape[2] * 8, x_noisy.shape[3] * 8),
                                                             mode="nearest-exact")
        if x_noisy.shape[0] != self.cond_hint.shape[0]:
            self.cond_hint = broadcast_image_to(self.cond_hint, x_noisy.shape[0], batched_number)
        assert len(self.transformer_options.get("cond_or_uncond", [])) == batched_number
        self.calls.append(tuple(self.cond_hint.shape))
        to = self.transformer_options
        self.seen.append({"x": tuple(x_noisy.shape), "t": t.clone(), "batched_number": batched_number,
                          "cond_or_uncond": list(to["cond_or_uncond"]), "cond_mark": to.get("cond_mark"),
                          "hint": self.cond_hint.clone(), "crossattn": tuple(cond["c_crossattn"].shape)})
        out = torch.nn.functional.avg_pool2d(self.cond_hint[:, :1], 8).to(x_noisy) * self.strength
        if isinstance(self.advanced_mask_weighting, torch.Tensor):
            out = out * torch.nn.functional.interpolate(self.advanced_mask_weighting.to(out), size=out.shape[-2:], mode="bilinear")
        out = out.expand(x_noisy.shape[0], *out.shape[1:])
        if self.soft is not None:
            mark = to["cond_mark"]
            out = out * (self.soft[0] * (1.0 - mark) + self.soft[1] * mark)[:, None, None, None]
        if prev is not None:
            out = out + prev["middle"][0]
        return {"input": [], "middle": [out], "output": []}


    def pre_run(self):  # controlnet.py:351 (the stand-in's timestep_range is given in sigmas already)
        self.pre_runs += 1

    def cleanup(self):  # controlnet.py:205-211, :355-357
        self.cond_hint = None
        self.cleanups += 1


class T2IAdapter(ControlNet):
    """controlnet.py:477: another ControlBase kind (not tiled by the adapter)."""


class ControlNetScriptsStandIn:
    """Forge's ControlNet script in process_before_every_sampling: puts the chain for this pass on
    the UnetPatcher (hires hint in the hires pass, p.is_hr_pass)."""

    def __init__(self, make_units):
        self.make_units = make_units  # (is_hr_pass) -> list of ControlNet, in the order of the UI's units
        self.alwayson_scripts = []

    def process_before_every_sampling(self, p, **kwargs):
        unet = p.sd_model.forge_objects.unet.clone()
        unet.controlnet_linked_list = None
        for cnet in self.make_units(p.is_hr_pass):  # unet.py:68-70 add_patched_controlnet: the new unit is the head
            cnet.previous_controlnet = unet.controlnet_linked_list
            unet.controlnet_linked_list = cnet
        p.sd_model.forge_objects.unet = unet

    def before_hr(self, p):
        pass


class ForgeImg2ImgStandIn(Img2ImgStandIn):
    """Forge's img2img sample(): forge_objects reset, then process_before_every_sampling
    (processing.py:666-671), then A1111's."""

    def __init__(self, *args, adapter=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter = adapter
        self.pbes_calls = 0

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self.pbes_calls += 1
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, c=conditioning,
                                                       uc=unconditional_conditioning)
        self.adapter.before_sampling(self)
        return super().sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts)
