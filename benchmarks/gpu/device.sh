#!/bin/bash
# The last call of the GPU check (benchmarks/gpu/run.py's header has the whole plan): join and check the
# onnxruntime-gpu wheel whose parts the earlier calls left under .gpu/, install it beside the image's torch (it
# shadows the image's CPU onnxruntime on PYTHONPATH), then run the check; arguments go to run.py.
# On the device: bash benchmarks/gpu/device.sh --model smollm2-135m --model llama-3.2-1b
set -o pipefail
OUT=${OUT:?OUT is where the device tool collects files}
python3 benchmarks/gpu/wheels.py join .gpu --out /tmp/wheels || exit 2
if [ ! -d /tmp/site/onnxruntime ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/wheels/*.whl \
    || exit 2
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
python3 benchmarks/gpu/run.py --out "$OUT" --provider cuda "$@" 2>&1 | tee "$OUT/log.txt"
