#!/usr/bin/env bash
# Issue 14's GPU check in one call on a lent GPU machine (never part of CI).
#
# Writes into $OUT (the device tool's folder; default benchmarks/results/device):
#   env.txt          nvidia-smi, Python, torch / CUDA, the packages dlm imports
#   pytest_gpu.log   the CUDA-only tests (pytest -m gpu), at most GPU_TESTS_S seconds (default 150)
#   gpu.json/.log    benchmarks/gpu.py --label LABEL --budget-scale SCALE (default 0.75: ~5.7 of its ~7.6 min)
# and stops early, saying why, when dlm does not import (nothing else would run).
#
# On the device (the machine's python3 holds torch with CUDA; dlm runs from src/, not installed), about 9 minutes:
#   bash benchmarks/device_check.sh after              # run's timeout_s 600
# The issue's "now" column was measured on an H200 (torch 2.11): ask for kind nvidia-h200 to compare with it.
# Here, on a CPU, the same script end to end in seconds (gpu.py's tiny shapes; the CUDA tests skip):
#   bash benchmarks/device_check.sh smoke --smoke
set -u
LABEL=${1:-after}
SMOKE=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/benchmarks/results/device}
PY=${PY:-python3}
GPU_TESTS_S=${GPU_TESTS_S:-150}
SCALE=${SCALE:-0.75}
mkdir -p "$OUT"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)

{
    echo "device_check $LABEL $SMOKE, $(date -u +%FT%TZ), commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("numpy", "tokenizers", "safetensors", "yaml", "tqdm", "matplotlib", "pytest", "hypothesis"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as e:
        print(name, "MISSING", e)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PY" -c "import dlm.cli, dlm.model, dlm.process, dlm.train" >>"$OUT/env.txt" 2>&1; then
    echo "device_check: dlm does not import here (see $OUT/env.txt); stopping" | tee -a "$OUT/env.txt"
    tail -5 "$OUT/env.txt"
    exit 2
fi

echo "== CUDA tests (pytest -m gpu, at most ${GPU_TESTS_S} s)"
timeout "$GPU_TESTS_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests >"$OUT/pytest_gpu.log" 2>&1
echo "pytest exit $?" >>"$OUT/pytest_gpu.log"
tail -25 "$OUT/pytest_gpu.log"

echo "== benchmarks/gpu.py (budget x $SCALE)"
if [ "$SMOKE" = "--smoke" ]; then
    extra=(--smoke --device cpu)
else
    extra=()
fi
# the AR decode row matters most (issue 14), then the diffusion calls; training (with its compiles) last
"$PY" benchmarks/gpu.py --label "$LABEL" --budget-scale "$SCALE" --out "$OUT/gpu.json" \
    --sections decode diffusion train "${extra[@]}" \
    >"$OUT/gpu.log" 2>&1
status=$?
tail -40 "$OUT/gpu.log"
echo "device_check: gpu.py exit $status, $(( $(date +%s) - t0 )) s in all; files in $OUT"
exit "$status"
