#!/usr/bin/env bash
# The GPU run on the device machine (no registry): install what `pack` carried, then run.
# From the repository root, after `python -m kerasft.benchmarks.gpu.pack --data FILE` here:
#   bash benchmarks/gpu/device.sh            (results under $OUT, or benchmarks/results/)
set -euo pipefail
cd "$(dirname "$0")/../.."
site=/tmp/kerasft-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .gpu/wheels/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target "$site" .
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
preset=$(python3 -m kerasft.benchmarks.gpu.pack --unpack .gpu/minilm-fp16 /tmp/minilm-fp32)
out="${OUT:-benchmarks/results}"
python3 -m kerasft.benchmarks.gpu.run --device cuda --preset "$preset" \
    --data .gpu/data/sarcasm_headlines_v1.jsonl --work /tmp/kerasft-gpu --out "$out/gpu.md" "$@"
