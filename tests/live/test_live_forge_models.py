"""Opt-in: the joint-attention capture on Forge's real Flux, Chroma and MMDiT-X classes (tests/live/
forge_real_dit.py, run with Forge's own python, since our venv has no Forge backend).

    FORGE_DIR=<Forge 2 checkout> FORGE_PYTHON=<Forge venv>/bin/python [TINY_DIR=<tiny checkpoints>] \\
        .venv/bin/python -m pytest -q tests/live/test_live_forge_models.py

(on this machine: FORGE_DIR=/work/ext-forge/forge FORGE_PYTHON=/work/ext-forge/venv/bin/python)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FORGE_DIR = os.environ.get("FORGE_DIR")
FORGE_PYTHON = os.environ.get("FORGE_PYTHON")
pytestmark = pytest.mark.skipif(not (FORGE_DIR and FORGE_PYTHON),
                                reason="set FORGE_DIR and FORGE_PYTHON to a Forge 2 checkout and its python")
SCRIPT = Path(__file__).with_name("forge_real_dit.py")


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run([FORGE_PYTHON, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600,
                         cwd=SCRIPT.parents[2])
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert run.returncode == 0 and line, (run.stdout[-3000:], run.stderr[-3000:])
    return {(r["family"], tuple(r["latent"])): r for r in json.loads(line[len("RESULTS "):])}


@pytest.mark.parametrize("family,latent", [("flux", (8, 12)), ("flux", (9, 7)), ("chroma", (8, 12)),
                                           ("chroma", (9, 7)), ("sd35", (8, 12))])
def test_capture_records_the_attention_forges_blocks_compute(results, family, latent):
    r = results[(family, latent)]
    assert r["identical_output"]  # recording changes nothing
    assert r["image_tokens_seen"] == r["grid"][0] * r["grid"][1]  # odd latents: the patch grid rounds up
    assert r["map_matches"], r["max_error"]
    assert r["other_row_empty"] and r["hooks_left"] == 0
    assert r["last_block_recorded"] and r["recorded_blocks"] == max(1, -(-r["blocks"] // 4))  # the last quarter
