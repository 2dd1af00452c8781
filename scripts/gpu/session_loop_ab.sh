#!/usr/bin/env bash
# GPU session (nvidia-h200): the evaluation loop before and after independent slot scheduling, on the
# same machine in one call (machines of one kind differ: a step's physics took 22 ms on one H200 box and
# 31 ms on another). Both run the main job's command (Pi0.5 random weights, compile, libero_spatial,
# 24 simulators, videos off) for a LIMIT-second window; the old code first (it pays the cold
# compilation; start-up is not part of the loop's rate).
#   rm -rf .cache/old_loop && mkdir -p .cache/old_loop && git archive f82bc81 envs policy runners videos conf \
#       | tar -x -C .cache/old_loop && echo f82bc81... > .cache/old_loop/.COMMIT
#   run(command="LIMIT=100 bash scripts/gpu/session_loop_ab.sh", carry=[".e2e/base", ".e2e/libero_spatial",
#       ".COMMIT", ".cache/old_loop"])
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/setup_device.sh
out=${OUT:-/tmp/out}; mkdir -p "$out" /tmp/runs
n=${NUM_ENVS:-24}; limit=${LIMIT:-100}
args="policy=pi05 policy.checkpoint=random backend=compile suite=libero_spatial num_envs=$n videos=none serial_baseline=false time_limit_s=$limit"
new=$PWD
{
echo "[ab] new $(cat .COMMIT 2>/dev/null) old $(cat .cache/old_loop/.COMMIT 2>/dev/null) num_envs=$n limit=${limit}s"
(cd .cache/old_loop && PYTHONPATH="$E2E_HOME/site:$PWD" timeout 340 python -m runners.bench_eval $args out=/tmp/runs/old \
    2>&1 | grep -v "SyntaxWarning\|__logo__" | tail -4)
cp /tmp/runs/old/bench_eval.json "$out/bench_eval_old_loop.json"
(cd "$new" && timeout 230 python -m runners.bench_eval $args out=/tmp/runs/new 2>&1 | grep -v "SyntaxWarning\|__logo__" | tail -4)
cp /tmp/runs/new/bench_eval.json "$out/bench_eval_new_loop.json"
} 2>&1 | tee "$out/session.log"
