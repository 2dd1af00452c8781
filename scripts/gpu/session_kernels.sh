#!/usr/bin/env bash
# GPU session for the fused expert kernels (issue 19, nvidia-h200): one denoise step's expert layers per
# implementation (scripts/gpu/expert_step_bench.py, optionally against an older kernel module OLD), the
# kernels' real-size GPU tests, then policy.bench at batch 1 with eager in the same run.
#   run(command="bash scripts/gpu/session_kernels.sh", carry=[".e2e/base", ".COMMIT"], kind="nvidia-h200")
# Writes $OUT/step10.json, gpu_tests.log, bench_b1.json, bench_b16.json and session.log. STAGES picks parts
# (default "step tests bench"; also "step160", "bench16"); BACKENDS / BACKENDS16 override the benches' backends.
set -uo pipefail
cd "$(dirname "$0")/../.."
E2E_CHECK=0 source scripts/gpu/setup_device.sh
out=${OUT:-/tmp/out}; mkdir -p "$out"
stages=${STAGES:-step tests bench}
backends=${BACKENDS:-eager,compile,compile:expert_kernels=triton,fp8,fp8:expert_kernels=triton}
log() { echo "[session $(date +%T)] $*"; }
{
log "commit $(cat .COMMIT 2>/dev/null)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
if [[ " $stages " == *" step "* ]]; then
  log "expert step, 10 rows"
  timeout 200 python scripts/gpu/expert_step_bench.py --rows 10 --out "$out/step10.json" ${OLD:+--old "$OLD"}
fi
if [[ " $stages " == *" step160 "* ]]; then
  log "expert step, 160 rows"
  timeout 120 python scripts/gpu/expert_step_bench.py --rows 160 --out "$out/step160.json"
fi
if [[ " $stages " == *" tests "* ]]; then
  log "GPU tests of the fused kernels"
  timeout 300 python -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py -k "triton or persistent or graph_call or same_bits" > "$out/gpu_tests.log" 2>&1
  log "rc=$? $(tail -1 "$out/gpu_tests.log")"; grep -E "^\[|triton|persistent" "$out/gpu_tests.log" | grep -E " us|vs eager" | head -30
fi
if [[ " $stages " == *" bench "* ]]; then
  log "bench batch 1"
  timeout 260 python -m policy.bench --backends "$backends" --batch 1 --steps 1,10 --iters 20 --out "$out/bench_b1.json"
fi
if [[ " $stages " == *" bench16 "* ]]; then
  log "bench batch 16"
  timeout 200 python -m policy.bench --backends "${BACKENDS16:-eager,compile,compile:expert_kernels=triton,fp8,fp8:expert_kernels=triton}" \
      --batch 16 --steps 10 --iters 10 --out "$out/bench_b16.json"
fi
log "done"
} 2>&1 | tee "$out/session.log"
