#!/usr/bin/env bash
# The one GPU run that decides which fused expert kernels (issue #19) to keep: the benchmark of every
# variant against eager, then the GPU tests (each Triton kernel against its torch reference at real size,
# with timings; the samplers against eager; compile stability and no device sync per call).
#
#   bash scripts/gpu_expert_kernels.sh OUT_DIR        # ~5 min on one H200
#
# Writes OUT_DIR/bench.json (saved after every row), bench.log and gpu_tests.log. The kernels run only
# with expert_kernels=triton; a kernel that fails to build or disagrees with its reference falls back to
# torch and says so in the row's "kernels" entry (and at the end of the table).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
backends=eager,compile,compile:expert_kernels=triton,compile:expert_kernels=triton/expert_attention=triton
backends=$backends,fp8,fp8:expert_kernels=triton/expert_attention=triton
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 250 python -m policy.bench --backends "$backends" --batch 1,16 --steps 10 --iters 20 \
    --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
timeout 110 python -m pytest -m gpu -q -s tests/test_gpu.py -k "triton or stable" 2>&1 | tee "$out/gpu_tests.log"
