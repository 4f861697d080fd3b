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
