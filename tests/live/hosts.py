"""Which WebUI the live tests drive, and its request quirks: one profile per host.

    SD_WEBUI_HOST = a1111 (default) | forge | neo | reforge | classic

``SD_WEBUI_FORGE=1`` (the older switch) means ``forge``. Every live test module takes the host's
quirks from ``HOST`` (hires fields, upscaler names, the X/Y/Z plot's script arguments, the model
families, the companions) so the same cases run on every host that has the feature and skip, with
the reason, on the others. What each host's quirk is and where it was seen:
../shared/hosts/README.md and ../shared/tinymodel/README.md (of the workplace), docs/hosts.md.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class Host:
    name: str
    label: str
    # hires fix
    latent_upscalers: bool = True  # "Latent" & co. in the hires upscaler list (Neo: none, HTTP 500)
    pixel_upscaler: str = "Lanczos"  # a pixel-space hires upscaler that needs no model file
    hr_additional_modules: bool = False  # Forge 2 / Neo: hires needs ["Use same choices"]
    hr_cfg: bool = False  # the API has a hires CFG; sent equal to cfg_scale (reForge's API defaults it to 1.0)
    infotext_list_fields: bool = False  # Forge 2 / Neo: an infotext request must set styles (apply_infotext)
    # Neo: an infotext without "Hires schedule type" makes the API fill in "Use same scheduler", which only
    # the UI maps to None (modules/txt2img.py:46): the request names the first pass's schedule itself
    infotext_hr_scheduler: bool = False
    # Neo: first-pass (and hires) sizes rounded to multiples of 64 (the bundle's modules/processing.py:893)
    size_multiple: int = 8
    # A1111 / Forge: LCM has its own output scaling (sd_samplers_lcm.py) and AccDiffusion steps aside;
    # Neo's LCM is k-diffusion's sample_lcm in its k-diffusion list, which the tiled pass drives
    lcm_steps_aside: bool = True
    # X/Y/Z plot ("x/y/z plot"): extra script arguments where A1111's 18 have none
    xyz_after_legend: tuple = ()  # reForge: draw_individual_labels, skip_grid, items_per_grid
    xyz_before_margin: tuple = ()  # Neo: row_count
    # models and companions
    families: tuple = ("sd15", "sdxl")  # checkpoint families the host loads (tiny models)
    controlnet: str = "extension"  # "extension" (sd-webui-controlnet) or "builtin" (Forge's)
    upscale_button: bool = True  # the txt2img ✨ Upscale button (txt2img_upscale handler)
    tiler: str | None = None  # the other UNet tiler AccDiffusion steps aside for (script title)
    tiler_tabs: tuple = ("txt2img", "img2img")  # where that tiler is offered
    tiler_args: tuple = ()  # its script arguments after `enabled`, for a 64-128 px job
    refiner: bool = True  # the API takes refiner_checkpoint (AccDiffusion steps aside for it)
    extra_samplers: tuple = ()  # hires samplers beyond A1111's that the tests run too (Forge's DDPM)
    # Forge Classic: no schedule type setting (no /sdapi/v1/schedulers, no hr_scheduler); the schedule is
    # part of the sampler's name ("DPM++ 2M Karras")
    schedule_types: bool = True
    # reForge / Forge Classic: the UI runs a job in modules_forge/main_thread.py's loop, which prints the
    # job's exception and hands the page None: a refused setting shows "TypeError: 'NoneType' object is
    # not iterable" there (the API still answers 422 with the message)
    ui_shows_job_errors: bool = True
    # Forge Classic: the img2img tab's "Steps" paste field has no api name (modules/ui.py), so an img2img
    # infotext request runs the API's default steps unless it names them
    img2img_infotext_steps: bool = True
    notes: dict = field(default_factory=dict)

    @property
    def forge_ui(self) -> bool:
        """Gradio 4 Forge (Forge 2, Neo): Hires CFG slider, distilled CFG, hires modules."""
        return self.name in ("forge", "neo")

    def upscaler(self, name: str = "Latent") -> str:
        """The host's hires upscaler for what a test asks: a latent one, or a pixel resize."""
        if name.startswith("Latent") and not self.latent_upscalers:
            return "None"  # Neo: a plain Lanczos resize of the decoded image
        if name == "Lanczos":
            return self.pixel_upscaler
        return name

    def hires(self, cfg_scale: float = 7) -> dict:
        """The request fields a hires job needs on this host besides A1111's."""
        out = {}
        if self.hr_additional_modules:
            out["hr_additional_modules"] = ["Use same choices"]
        if self.hr_cfg:
            out["hr_cfg"] = cfg_scale
        return out

    def infotext_fields(self, cfg_scale: float = 7, hires: bool = True) -> dict:
        """What an infotext request (``{"infotext": ...}``) must also carry on this host."""
        out = self.hires(cfg_scale) if hires else {}
        if self.infotext_list_fields:
            # Forge's apply_infotext calls isinstance(value, list[str]) for the list-typed fields it fills
            # (styles, hires modules) and fails: the request sets those itself
            out["styles"] = []
        if hires and self.infotext_hr_scheduler:
            out["hr_scheduler"] = "Automatic"  # the tests' first pass: "Schedule type: Automatic"
        return out

    def img2img_infotext_fields(self, steps: int) -> dict:
        """What an img2img infotext request must also carry on this host (beyond ``infotext_fields``)."""
        return {} if self.img2img_infotext_steps else {"steps": steps}

    def size(self, pixels: float) -> int:
        """A requested width or height as the host makes it (Neo rounds to 64, at least 64)."""
        if self.size_multiple == 64:
            return max(int((pixels + 32) // 64) * 64, 64)
        return int(pixels)

    def hires_size(self, width: int, height: int, scale: float = 2, resize=None) -> tuple:
        """The hires image size of a first pass ``width`` x ``height`` on this host."""
        w, h = resize or (self.size(width) * scale, self.size(height) * scale)
        return self.size(w), self.size(h)

    def xyz_args(self, x_type: int, x_values: str = "", x_dropdown: list | None = None) -> list:
        """The X/Y/Z plot's script_args: X axis only, legend and the cells' own images on, no margin."""
        return ([x_type, x_values, list(x_dropdown or []), 0, "", [], 0, "", [], True]
                + list(self.xyz_after_legend)
                + [True, False, False, False, False, False]
                + list(self.xyz_before_margin)
                + [0, False])

    def tiler_request(self, enabled: bool) -> dict:
        return {self.tiler: {"args": [enabled, *self.tiler_args]}}

    # --- skip helpers --------------------------------------------------------------------------------------
    def need_latent_upscaler(self, why: str = "") -> None:
        if not self.latent_upscalers:
            pytest.skip(f"{self.label} has no latent hires upscaler{': ' + why if why else ''}")

    def need_schedule_types(self) -> None:
        if not self.schedule_types:
            pytest.skip(f"{self.label} has no schedule type setting (the schedule is in the sampler's name)")

    def need_family(self, family: str) -> None:
        if family not in self.families:
            pytest.skip(f"{self.label} does not load {family} checkpoints")


HOSTS = {
    "a1111": Host("a1111", "AUTOMATIC1111", tiler="Tiled Diffusion"),
    "forge": Host("forge", "Forge 2", hr_additional_modules=True, hr_cfg=True, infotext_list_fields=True,
                  families=("sd15", "sdxl", "flux", "chroma", "sd35"), controlnet="builtin",
                  # forge_multidiffusion.py:20-30: enabled, method, tile width/height, overlap (pixels), batch
                  tiler="MultiDiffusion Integrated", tiler_args=("MultiDiffusion", 128, 128, 64, 4),
                  extra_samplers=("DDPM",)),
    "neo": Host("neo", "Forge Neo", latent_upscalers=False, pixel_upscaler="None", hr_additional_modules=True,
                hr_cfg=True, infotext_list_fields=True, infotext_hr_scheduler=True, xyz_before_margin=(0,),
                size_multiple=64, lcm_steps_aside=False, extra_samplers=("LCM",),
                families=("sd15", "sdxl", "flux", "chroma"), controlnet="builtin",
                # Neo's sd_forge_multidiffusion: img2img only (show() is None for txt2img), tiles >= 256 px
                tiler="MultiDiffusion Integrated", tiler_tabs=("img2img",),
                tiler_args=("MultiDiffusion", 256, 256, 64, 4)),
    "reforge": Host("reforge", "reForge", hr_cfg=True, xyz_after_legend=(False, False, 0), controlnet="builtin",
                    ui_shows_job_errors=False,
                    # reForge's multidiffusion: enabled, method, tile w/h, overlap, batch, shift method
                    tiler="MultiDiffusion Integrated", tiler_args=("MultiDiffusion", 128, 128, 64, 4, "random")),
    "classic": Host("classic", "Forge Classic", controlnet="builtin", schedule_types=False,
                    ui_shows_job_errors=False, img2img_infotext_steps=False),
}


def _host_name() -> str:
    name = os.environ.get("SD_WEBUI_HOST", "").strip().lower()
    if not name:
        name = "forge" if os.environ.get("SD_WEBUI_FORGE") == "1" else "a1111"
    aliases = {"forge2": "forge", "forge-neo": "neo", "forge-classic": "classic", "automatic1111": "a1111"}
    name = aliases.get(name, name)
    if name not in HOSTS:
        raise ValueError(f"SD_WEBUI_HOST={name!r}: one of {', '.join(HOSTS)}")
    return name


HOST = HOSTS[_host_name()]
URL = os.environ.get("SD_WEBUI_URL")


@functools.lru_cache(maxsize=None)
def _get(path: str):
    if not URL:
        return None
    try:
        with urllib.request.urlopen(URL.rstrip("/") + path, timeout=60) as r:
            return json.load(r)
    except (OSError, urllib.error.URLError, ValueError):
        return None


def samplers() -> list[str]:
    """The host's sampler names (GET /sdapi/v1/samplers)."""
    return [s["name"] for s in _get("/sdapi/v1/samplers") or []]


def need_sampler(name: str) -> None:
    have = samplers()
    if have and name not in have:
        pytest.skip(f"{HOST.label} has no sampler {name!r}")


def schedulers() -> list[str]:
    return [s["label"] for s in _get("/sdapi/v1/schedulers") or []]


def need_scheduler(name: str) -> None:
    HOST.need_schedule_types()
    have = schedulers()
    if have and name not in have:
        pytest.skip(f"{HOST.label} has no scheduler {name!r}")


def script_offered(title: str, tab: str = "txt2img") -> bool:
    """The script (by title, case-insensitive) is in the host's /sdapi/v1/scripts list for ``tab``."""
    return title.lower() in (_get("/sdapi/v1/scripts") or {}).get(tab, [])
