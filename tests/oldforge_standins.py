"""Stand-ins for the hosts built on Forge's patcher other than Forge 2: the old Forge backend of
Forge Classic and reForge (``ldm_patched``, ``modules_forge``) and Forge Neo, as far as they differ
from Forge 2 (tests/forge_standins.py, which they reuse).

Mirrored (reForge = Panchovix/stable-diffusion-webui-reForge 3b56b268, Classic =
Haoming02/sd-webui-forge-classic 1f95d717, Neo = Neo 2.26 as bundled in exo101/sd-webui-forge-neo-v3
de2193d9, webui/):
- reForge ldm_patched/ldm/modules/attention.py:685 ``optimized_attention(q, k, v, heads,
  attn_precision=...)`` (the block passes its precision, :755); Classic's takes none (:124, :441)
- reForge modules_forge/forge_sampler.py:121-146 sampling_prepare (the estimate from
  ``model_options["memory_peak_estimation_modifier"]``, else ``unet.memory_required``; ControlNet
  pre_run) / sampling_cleanup; ldm_patched/modules/model_management.py get_free_memory
- reForge ldm_patched/modules/samplers.py:262-272: ``model.memory_required(input_shape,
  cond_shapes=...)``; :329 ``control.get_control(input_x, timestep_, c, len(cond_or_uncond),
  transformer_options)`` (Classic, Forge 2 and Neo: four arguments)
- the old model: ``model.model_sampling`` (ModelSamplingDiscrete: sigmas, timestep(σ), sigma_data)
  and ``model.model_type`` (ModelType.EPS …) instead of Forge 2's ``model.predictor``; the A1111
  shell keeps sgm's ``conditioner`` for SDXL (reForge modules/sd_models.py:783-785), whose
  refiner has an aesthetic-score embedder
- Neo backend/patcher/base.py:259 ``UnetPatcher.memory_required`` asked by sampling_prepare
  (sampling_function.py:365-369), no ``set_memory_peak_estimation_modifier``; prompt_parser.py:163
  ``get_learned_conditioning(model, prompts, steps, hires_steps=None)``; processing.py:1429-1454
  (the hires pass sets the model's shift and writes the hires infotext fields)
"""

from __future__ import annotations

import enum
import sys
import types

import pytest

from forge_standins import (ForgeModelStandIn, KModelStandIn, UnetPatcherStandIn, ForgeObjects, attention_function)

OLD_FORGE_MODULES = ("ldm_patched", "ldm_patched.ldm", "ldm_patched.ldm.modules", "ldm_patched.ldm.modules.attention",
                     "ldm_patched.modules", "ldm_patched.modules.model_management", "modules_forge",
                     "modules_forge.forge_sampler")
FORGE2_MODULES = ("backend", "backend.nn", "backend.nn.unet", "backend.sampling", "backend.sampling.sampling_function",
                  "backend.memory_management")


def old_forge_modules(with_precision: bool = True) -> dict[str, types.ModuleType]:
    """The old backend's modules: reForge's attention (``attn_precision``) or Classic's."""
    mods = {name: types.ModuleType(name) for name in OLD_FORGE_MODULES}
    attention = mods["ldm_patched.ldm.modules.attention"]
    attention.precisions = []
    if with_precision:
        def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
            attention.precisions.append(attn_precision)
            return attention_function(q, k, v, heads)
    else:
        def optimized_attention(q, k, v, heads, mask=None):
            attention.precisions.append("none")
            return attention_function(q, k, v, heads)
    attention.optimized_attention = optimized_attention
    memory = mods["ldm_patched.modules.model_management"]
    memory.free, memory.asked = 8 * 2**30, []
    memory.get_free_memory = lambda dev=None, torch_free_too=False: memory.asked.append(dev) or memory.free
    sampler = mods["modules_forge.forge_sampler"]
    sampler.calls = []

    def sampling_prepare(unet, x):  # forge_sampler.py:121-143
        estimate = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)
        sampler.calls.append(("prepare", estimate([x.shape[0] * 2, *x.shape[1:]])))
        for cnet in unet.list_controlnets() if hasattr(unet, "list_controlnets") else []:
            cnet.pre_run()

    def sampling_cleanup(unet):
        sampler.calls.append(("cleanup", None))

    sampler.sampling_prepare, sampler.sampling_cleanup = sampling_prepare, sampling_cleanup
    return mods


@pytest.fixture
def old_forge_host(monkeypatch):
    """A WebUI process on the old Forge backend: ``backend`` cannot be imported, ``ldm_patched`` /
    ``modules_forge`` can; the facade finds its building blocks anew (and again afterwards)."""
    from accdiffusion.entry import facade

    for name in FORGE2_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import backend...` raises ImportError
    mods = old_forge_modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    facade.host_backends.cache_clear()
    yield mods
    facade.host_backends.cache_clear()


class ModelType(enum.Enum):  # ldm_patched/modules/model_base.py ModelType
    EPS = 1
    V_PREDICTION = 2


class OldKModelStandIn(KModelStandIn):
    """ldm_patched's BaseModel: ``model_sampling`` and ``model_type``, no ``predictor``;
    ``memory_required(input_shape, cond_shapes={})`` (reForge model_base.py)."""

    def __init__(self, model):
        super().__init__(model)
        self.model_sampling = self.__dict__.pop("predictor")  # `.predictor` now raises AttributeError
        self.model_type = ModelType.EPS
        self.cond_shapes_seen: list = []

    def memory_required(self, input_shape, cond_shapes={}):
        self.cond_shapes_seen.append(cond_shapes)
        return super().memory_required(input_shape)


class OldUnetPatcherStandIn(UnetPatcherStandIn):
    """reForge samplers.py:272 asks the model with ``cond_shapes=``."""

    def memory_required(self, input_shape):
        return self.object_patches.get("memory_required", self.model.memory_required)(input_shape=input_shape,
                                                                                       cond_shapes={"c_crossattn": []})


class OldForgeModelStandIn(ForgeModelStandIn):
    """The A1111 shell of old Forge around ldm_patched's model: ``forge_objects`` with the old
    UnetPatcher; SDXL keeps sgm's ``conditioner`` (embedders with ``input_key``)."""

    def __init__(self, host, sdxl: bool, refiner: bool = False):
        super().__init__(host, sdxl)
        self.is_sdxl = sdxl
        if sdxl:
            keys = ["txt", "original_size_as_tuple", "crop_coords_top_left"]
            keys += ["aesthetic_score"] if refiner else ["target_size_as_tuple"]
            self.conditioner = types.SimpleNamespace(embedders=[types.SimpleNamespace(input_key=k) for k in keys])
        self.kmodel = OldKModelStandIn(self)
        self.forge_objects_after_applying_lora = ForgeObjects(OldUnetPatcherStandIn(self.kmodel))
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()


class NeoUnetPatcherStandIn(UnetPatcherStandIn):
    """Neo base.py:259: the patcher's own memory_required (the model's, asked by sampling_prepare
    and the cond/uncond batching), and no peak-estimation modifier."""

    set_memory_peak_estimation_modifier = property(lambda self: (_ for _ in ()).throw(AttributeError("Neo")))

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)


class NeoModelStandIn(ForgeModelStandIn):
    """A Neo engine: the patcher above, and ``set_shift`` (diffusion_engine/base.py:106)."""

    def __init__(self, host, sdxl: bool):
        super().__init__(host, sdxl)
        self.forge_objects_after_applying_lora = ForgeObjects(NeoUnetPatcherStandIn(self.kmodel))
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()
        self.shifts: list = []
        self.use_distilled_cfg_scale = self.use_shift = False

    def set_shift(self, shift):
        self.shifts.append(shift)
