#!/usr/bin/env bash
# GPU session 1 (nvidia-h200): Pi0.5 latency (every backend and the fused expert kernels against eager,
# real-time chunking's cost per step) and the simulator's scaling with the number of processes.
#   run(command="bash scripts/gpu/session_bench.sh", carry=[".e2e", ".COMMIT"], kind="nvidia-h200")
# Writes $OUT/bench_b1.json, scale{8,16,24,32}.json, bench_b16.json, bench_rtc.json and session.log (each
# step is time-boxed, the most important first; files are written as steps finish).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/setup_device.sh
out=${OUT:-/tmp/out}; mkdir -p "$out"
log() { echo "[session $(date +%T)] $*"; }
{
log "commit $(cat .COMMIT 2>/dev/null)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
log "bench batch 1"
timeout 230 python -m policy.bench --backends eager,compile,compile:expert_kernels=triton,fp8,fp8:expert_kernels=triton \
    --batch 1 --steps 1,10 --iters 20 --out "$out/bench_b1.json"
log "scaling (zero policy rendered for as an image policy; 25 s windows)"
for n in 8 16 24 32; do
  timeout 70 python -m runners.bench_eval policy=zero policy.needs_images=true suite=libero_spatial num_envs=$n \
      videos=none serial_baseline=false time_limit_s=25 out=/tmp/runs/scale$n > /tmp/runs_scale$n.log 2>&1
  rc=$?; cp /tmp/runs/scale$n/bench_eval.json "$out/scale$n.json" 2>/dev/null
  log "num_envs=$n rc=$rc $(python -c "import json; r=json.load(open('$out/scale$n.json')); print(r['env_steps_per_s'], 'steps/s', r['episodes_per_hour'], 'ep/h', r['phases'])" 2>/dev/null)"
  [ $rc -ne 0 ] && tail -5 /tmp/runs_scale$n.log
done
log "bench batch 16"
timeout 75 python -m policy.bench --backends eager,compile,fp8 --batch 16 --steps 10 --iters 10 --out "$out/bench_b16.json"
log "bench rtc"
timeout 60 python -m policy.bench --backends compile,compile:rtc=true,eager:rtc=true --batch 1 --steps 10 --iters 10 \
    --out "$out/bench_rtc.json"
log "done"
} 2>&1 | tee "$out/session.log"
