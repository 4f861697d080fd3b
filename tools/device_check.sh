#!/usr/bin/env bash
# Run THERE (the lent GPU machine), from the repository root, after tools/device_prepare.sh ran here:
# the issue-11 GPU measurements in one command, logs and JSON under $OUT.
#   bash tools/device_check.sh              # H200/H100: random-weight SDXL UNet (the real config, diffusers), fp16
#   bash tools/device_check.sh --cpu-smoke  # the same steps on a CPU: tiny diffusers UNet, tiny sizes
# 1. installs the carried wheels (.whl/) into $DEVICE_SITE (/tmp/site) and prints the versions used;
# 2. bench A: first pass 1024² with and without recording (20 steps), then 1024² → 2048² (50 hires
#    steps) and 1024² → 4096² (three stages, 20 steps each) in the shifted and the overlap window
#    modes, automatic tile batch, shifted at the default window grain (1 latent px; GRAIN=0 for the
#    UNet's size multiple, as before the setting); JSON rewritten after each run, so a cut-short run
#    keeps its figures;
# 3. bench B, if time is left: 2048² overlap at tile batch 8, like the earlier 30.7 s measurement.
# Estimated on one H200 (docs/speed.md, On a GPU): about 4-5 minutes in all; each bench has its own timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SITE=${DEVICE_SITE:-/tmp/site}
OUT=${OUT:-/tmp/accdiffusion-device-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_check.log") 2>&1

if [[ ${1:-} == --cpu-smoke ]]; then
    # tiny widths and sizes: proves the wheels, the imports and the code path, times nothing
    # (about 1 min; SMOKE_FP16=1 adds the GPU's --fp16 autocast, about 6 min on 2 busy cores)
    COMMON=(--device cpu --model sdxl-real-tiny --base 16 --sampler builtin)
    [[ ${SMOKE_FP16:-0} == 1 ]] && COMMON+=(--fp16)
    A=(--scales 2,4 --steps 2,2 --first-steps 2)
    B=(--scales 2 --steps 2 --first-steps 1)
    LIMIT_A=${LIMIT_A:-500} LIMIT_B=200 B_IF_BEFORE=${B_IF_BEFORE:-500}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    COMMON=(--device cuda --model sdxl-real --fp16 --base 128 --sampler builtin)
    A=(--scales 2,4 --steps "${STEPS_2X:-50},${STEPS_4X:-20}" --first-steps 20)
    B=(--scales 2 --steps "${STEPS_2X:-50}" --first-steps 1)
    LIMIT_A=${LIMIT_A:-390} LIMIT_B=120 B_IF_BEFORE=${B_IF_BEFORE:-330}
fi

echo "== install carried wheels into $SITE"
ls .whl/*.whl
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export ACCDIFFUSION_TOKENIZER_DIR=${ACCDIFFUSION_TOKENIZER_DIR:-$PWD/.devicekit/clip-text-tiny}
[[ -f $ACCDIFFUSION_TOKENIZER_DIR/vocab.json ]] || { echo "no tokenizer at $ACCDIFFUSION_TOKENIZER_DIR: run tools/device_prepare.sh here and carry .devicekit" >&2; exit 1; }

echo "== versions"
"$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "numpy", "transformers", "tokenizers", "huggingface_hub", "diffusers", "cv2", "k_diffusion"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except ImportError as error:
        print(f"{name} missing ({error})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true

start=$SECONDS
GRAIN=${GRAIN:-1}
echo "== bench A: ${COMMON[*]} ${A[*]} --modes shifted,overlap --window-grain $GRAIN"
status=0
timeout "$LIMIT_A" "$PY" -m accdiffusion.lab.bench "${COMMON[@]}" "${A[@]}" --modes shifted,overlap --window-grain "$GRAIN" \
    --json "$OUT/bench_a.json" 2>&1 | tee "$OUT/bench_a.log" || status=$?
echo "== bench A exit $status after $((SECONDS - start)) s"

if (( SECONDS - start < B_IF_BEFORE )); then
    echo "== bench B (like the earlier 30.7 s): ${COMMON[*]} ${B[*]} --modes overlap --tile-batch-size 8"
    timeout "$LIMIT_B" "$PY" -m accdiffusion.lab.bench "${COMMON[@]}" "${B[@]}" --modes overlap --tile-batch-size 8 \
        --json "$OUT/bench_b.json" 2>&1 | tee "$OUT/bench_b.log" || status=$((status ? status : $?))
    echo "== bench B done after $((SECONDS - start)) s"
else
    echo "== bench B skipped: $((SECONDS - start)) s spent"
fi

echo "== summary"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for name in ("bench_a.json", "bench_b.json"):
    path = Path(sys.argv[1]) / name
    if not path.exists():
        print(f"{name}: none")
        continue
    report = json.loads(path.read_text())
    first = report.get("first_pass")
    if first:
        print(f"{name}: {report['device']}, first pass {first['steps']} steps {first['plain_s']:.2f} s, "
              f"recording x{first['recording_ratio']:.3f}")
    for run in report["runs"]:
        batches = ",".join(str(s["tile_batch"]) for s in run["stages"])
        mode = run["mode"] + (f" g{run['window_grain']}" if run["mode"] == "shifted" else "")
        print(f"  {run['target_px'][0]}px {mode:<11} {run['steps']} steps/stage: {run['seconds']:.1f} s, "
              f"{run['seconds_per_step']:.3f} s/step, peak {run['peak_mib']:.0f} MiB, "
              f"evals {run['window_evals']}/{run['formula']}, latent px {run['latent_pixels']}, batch {batches}")
EOF
exit "$status"
