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
    from accdiffusion.reference import load_tokenizer

    if not TOKENIZER_DIR.exists():
        pytest.fail(f"CLIP tokenizer files not found at {TOKENIZER_DIR}; set ACCDIFFUSION_TOKENIZER_DIR")
    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def sd1_host(tokenizer):
    from accdiffusion.reference import Host, build_unet

    return Host(build_unet("sd1", seed=1), tokenizer)


@pytest.fixture(scope="session")
def sdxl_host(tokenizer):
    from accdiffusion.reference import Host, build_unet

    return Host(build_unet("sdxl", seed=2), tokenizer, vector_conditioning=True)


@pytest.fixture
def denoisers(monkeypatch):
    """Every StageDenoiser the job makes, in order (the job's own class, recorded as it is built)."""
    from accdiffusion import hires
    from accdiffusion import job as job_module

    made = []

    def recording(*args, **kwargs):
        made.append(hires.StageDenoiser(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(job_module, "StageDenoiser", recording)
    return made
