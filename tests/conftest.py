import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER_DIR = Path(os.environ.get("ACCDIFFUSION_TOKENIZER_DIR",
                                    ROOT.parent / "shared" / "tinymodel" / "clip-text-tiny"))


@pytest.fixture(scope="session")
def tokenizer():
    from accdiffusion.lab.reference import load_tokenizer

    if not TOKENIZER_DIR.exists():
        pytest.fail(f"CLIP tokenizer files not found at {TOKENIZER_DIR}; set ACCDIFFUSION_TOKENIZER_DIR")
    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def sd1_host(tokenizer):
    from accdiffusion.lab.reference import Host, build_unet

    return Host(build_unet("sd1", seed=1), tokenizer)


@pytest.fixture(scope="session")
def sdxl_host(tokenizer):
    from accdiffusion.lab.reference import Host, build_unet

    return Host(build_unet("sdxl", seed=2), tokenizer, vector_conditioning=True)


# The WebUI stand-in models over the session's hosts: one per test module (tests change their state)
@pytest.fixture(scope="module")
def sd1_model(sd1_host):
    from a1111_standins import StandInModel

    return StandInModel(sd1_host, sdxl=False)


@pytest.fixture(scope="module")
def sdxl_model(sdxl_host):
    from a1111_standins import StandInModel

    return StandInModel(sdxl_host, sdxl=True)


@pytest.fixture(scope="module")
def forge_sd1(sd1_host):
    from forge_standins import ForgeModelStandIn

    return ForgeModelStandIn(sd1_host, sdxl=False)


@pytest.fixture(scope="module")
def forge_sdxl(sdxl_host):
    from forge_standins import ForgeModelStandIn

    return ForgeModelStandIn(sdxl_host, sdxl=True)


@pytest.fixture(scope="module")
def forge_backend():
    """Forge's ``backend`` package stand-in in sys.modules, for modules that run the Forge backend."""
    from forge_standins import install_backend_module

    install_backend_module()
    from accdiffusion.entry import facade

    facade.host_backends.cache_clear()  # found again, with the stand-in's building blocks


@pytest.fixture
def denoisers(monkeypatch):
    """Every StageDenoiser the job makes, in order (the job's own class, recorded as it is built)."""
    from accdiffusion.method import hires
    from accdiffusion.flows import job as job_module

    made = []

    def recording(*args, **kwargs):
        made.append(hires.StageDenoiser(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(job_module, "StageDenoiser", recording)
    return made


@pytest.fixture
def stage_prompts(monkeypatch):
    """Per stage of the tiled pass: (the stage, its windows, the tile prompts per image), as the job
    scheduled them (its own ``_tile_schedules``, recorded)."""
    from accdiffusion.flows import job as job_module

    seen = []
    original = job_module._tile_schedules

    def spy(plans, stage, windows, settings, cache):
        schedules, prompts = original(plans, stage, windows, settings, cache)
        seen.append((stage, windows, prompts))
        return schedules, prompts

    monkeypatch.setattr(job_module, "_tile_schedules", spy)
    return seen


@pytest.fixture
def stage_output_stats(monkeypatch):
    """(mean, std, output) of every restandardise_stage_output call, and the latents the job took
    per-channel statistics of."""
    from accdiffusion.flows import job as job_module

    seen, per_channel_of = [], []
    restandardise_output, stats = job_module.restandardise_stage_output, job_module.latent_stats

    def output_spy(latent, mean, std):
        out = restandardise_output(latent, mean, std)
        seen.append((mean, std, out))
        return out

    def stats_spy(x, per_channel=False):
        if per_channel:
            per_channel_of.append(x.clone())
        return stats(x, per_channel)

    monkeypatch.setattr(job_module, "restandardise_stage_output", output_spy)
    monkeypatch.setattr(job_module, "latent_stats", stats_spy)
    return seen, per_channel_of
