#!/usr/bin/env bash
# GPU session 3 (nvidia-h200-x2): the GPU tests (both GPUs: compiled backends on cuda:1, a 2-job joblib
# sweep with one job per GPU) while a stability soak runs on GPU 1: 1,000 episodes (libero_spatial, seeds
# 7 and 8, max_steps 60) of the compiled Pi0.5 with its 16 simulators rendering through EGL on the same
# GPU (another harness saw CUDA and EGL on one GPU abort nondeterministically).
#   run(command="bash scripts/gpu/session_x2.sh", carry=[".e2e", ".COMMIT"], kind="nvidia-h200-x2")
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/setup_device.sh
out=${OUT:-/tmp/out}; mkdir -p "$out" /tmp/runs
t0=$(date +%s)
{
echo "[x2] commit $(cat .COMMIT 2>/dev/null); $(nvidia-smi --query-gpu=name --format=csv,noheader | tr '\n' ' ')"
python -m runners.evaluate policy=pi05 policy.checkpoint=random backend=compile device=cuda:1 \
    suite=libero_spatial "seeds=[7,8]" max_steps=60 num_envs=16 videos=none out=/tmp/runs/soak > /tmp/soak.log 2>&1 &
soak=$!
timeout 200 python -m pytest -m multigpu -q -s -p no:cacheprovider tests/test_gpu_harness.py 2>&1 \
    | tail -c 40000 > "$out/pytest_multigpu.log"
echo "[x2] multigpu pytest rc=${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"; tail -3 "$out/pytest_multigpu.log"
left=$(( 470 - ($(date +%s) - t0) ))
[ $left -gt 30 ] && timeout $left python -m pytest -m "gpu and not multigpu" -q -s -p no:cacheprovider \
    tests/test_gpu.py tests/test_gpu_harness.py 2>&1 | tail -c 60000 > "$out/pytest_gpu.log"
echo "[x2] gpu pytest done after $(( $(date +%s) - t0 )) s"; tail -3 "$out/pytest_gpu.log"
while kill -0 $soak 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt 500 ]; do sleep 5; done
if kill -0 $soak 2>/dev/null; then echo "[x2] soak still running at $(( $(date +%s) - t0 )) s: stopping it"; kill -TERM $soak; sleep 10; fi
echo "[x2] soak: $(wc -l < /tmp/runs/soak/results.jsonl 2>/dev/null) result lines"
python - <<'PY'
import json, collections
recs = [json.loads(l) for l in open("/tmp/runs/soak/results.jsonl")]
errs = [r["error"][:200] for r in recs if r.get("error")]
print("[x2] soak episodes", len(recs), "errors", len(errs), collections.Counter(e.split(":")[0] for e in errs))
PY
cp /tmp/runs/soak/summary.json "$out/soak_summary.json" 2>/dev/null
tail -c 20000 /tmp/soak.log > "$out/soak.log"
} 2>&1 | tee "$out/session.log"
