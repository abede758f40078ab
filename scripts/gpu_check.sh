#!/usr/bin/env bash
# GPU check of the RevNet coupling kernels and the memory-saving reversible backward: the
# CUDA-marked tests (kernels against their references on CUDA tensors, int64 indexing past 2**31
# elements, RevNet50 memory saving against plain autograd in fp32 and bf16 autocast), then
# benchmarks/revnet_memory.py on the GPU (memory, step time, drift, and the kernels against their
# torch references). About 3 minutes on one H100/H200; each part has its own time limit.
#
# Needs python3 with torch, triton and pytest; not pydantic or mlflow. Logs go to $OUT when set
# (else a fresh temporary folder). Exit status: non-zero if any part failed.
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

part environment 60 bash -c "nvidia-smi; $python -c 'import torch, triton; \
print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
part tests 200 "$python" -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_revnet_kernels.py tests/test_reversible.py
part benchmark 150 "$python" benchmarks/revnet_memory.py --device cuda
exit "$failed"
