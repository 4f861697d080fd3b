#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), in the repository, before the GPU call: puts what the GPU
# machine lacks for `tools/device_check.sh` into two ignored folders that the call carries.
#   .whl/        wheels for its Python 3.12 (it has torch, numpy, transformers, opencv; no diffusers)
#   .devicekit/  the CLIP tokenizer files (../shared does not travel)
# Then: device run with carry [".whl", ".devicekit"] and command `bash tools/device_check.sh` (docs/development.md, On a lent GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOKENIZER=${ACCDIFFUSION_TOKENIZER_DIR:-../shared/tinymodel/clip-text-tiny}
# Only diffusers (for the real SDXL UNet config) is missing there; its own needs (huggingface-hub
# >= 1.32, safetensors, numpy, pillow, regex, requests, filelock) are on the machine's list.
WHEELS=(diffusers==0.42.1)

for path in .whl .devicekit; do  # .gitignore lists both; a checkout without that line gets it here
    if ! git check-ignore -q "$path"; then
        echo "/$path/" >> "$(git rev-parse --git-path info/exclude)"
    fi
done

rm -rf .whl .devicekit
mkdir -p .whl .devicekit
# the device README's download line: CPython 3.12 wheels, manylinux or pure Python, no dependencies
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

if [[ ! -f $TOKENIZER/vocab.json ]]; then
    echo "no CLIP tokenizer files at $TOKENIZER (set ACCDIFFUSION_TOKENIZER_DIR)" >&2
    exit 1
fi
cp -r "$TOKENIZER" .devicekit/clip-text-tiny
chmod -R u+w .devicekit  # shared/ is read-only; a later run must be able to replace the copy

git check-ignore -q .whl && git check-ignore -q .devicekit  # carried paths must be ignored, or they travel twice
ls -l .whl .devicekit/clip-text-tiny
du -sh .whl .devicekit
