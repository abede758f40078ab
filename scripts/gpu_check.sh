#!/usr/bin/env bash
# The project's GPU check, for sessions lent a CUDA machine (also `make gpu-check`): every
# CUDA-marked test (RevNet coupling kernels and memory-saving backward against plain autograd,
# patch-extraction kernel against its reference, the cupy path of the RNG, augmentation and the
# pretext tasks on CUDA, deterministic training steps), then the GPU benchmarks: RevNet memory,
# drift and kernels, patch extraction, data pipeline and training step, each with --device cuda.
# About 12 minutes on one H100/H200; each part has its own time limit.
#
# Needs python3 with torch, triton, cupy and pytest. Where pydantic is missing (the lent machines'
# image lacks it), wheels carried in .whl/ are installed first (see the device tool's notes).
# Logs go to $OUT when set (else a fresh temporary folder). Exit status: non-zero if any part
# failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
logs="${OUT:-$(mktemp -d)}"
mkdir -p "$logs"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0
echo "logs: $logs"

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $logs/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"; then
        echo "== $name: ok"
    else
        echo "== $name: FAILED (exit ${PIPESTATUS[0]})"
        failed=1
    fi
}

if ! "$python" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --target /tmp/ssltk-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/ssltk-site"
fi

part environment 60 bash -c "nvidia-smi; $python -c 'import torch, triton; \
print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
part tests 240 "$python" -m pytest -q -p no:cacheprovider -m cuda tests/
part bench-revnet 120 "$python" benchmarks/revnet_memory.py --device cuda
part bench-revnet-drift 120 "$python" benchmarks/revnet_drift.py --device cuda
part bench-revnet-kernels 60 "$python" benchmarks/revnet_kernels.py --device cuda
part bench-patches 60 "$python" benchmarks/patch_extraction.py --device cuda
part bench-data 60 "$python" benchmarks/data_pipeline.py --device cuda
part bench-train 90 "$python" benchmarks/train_step.py --device cuda
# Issue 23: the L-BFGS probe on the device (CuPy, one float16 copy, its memory plan) against the
# CPU on real features, and bf16 extraction.
part bench-probe 240 "$python" benchmarks/linear_probe.py --device cuda
part eval-bf16 240 bash -c "$python -m ssltk prepare && $python -m ssltk eval --baseline \
    --set eval.device=cuda --set eval.cache_dtype=float16 --set eval.autocast=bf16 \
    --set eval.workers=4 --out $logs/eval-bf16"
exit "$failed"
