#!/usr/bin/env bash
# GPU session (nvidia-h200): the evaluation loop before and after independent slot scheduling, on the
# same machine in one call (machines of one kind differ: a step's physics took 22 ms on one H200 box and
# 31 ms on another). Both run the main job's command (Pi0.5 random weights, compile, libero_spatial,
# 24 simulators, videos off) for a LIMIT-second window; the old code first (it pays the cold
# compilation; start-up is not part of the loop's rate). ORDER="new old" reverses the order: the first
# run's window also holds each worker's first reset, where robosuite's numba code compiles (cached after).
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
t=340  # the first run pays the cold compilation and the simulator's numba JIT; the second gets less
for which in ${ORDER:-old new}; do
  if [ "$which" = old ]; then dir=.cache/old_loop; else dir=.; fi
  (cd "$dir" && PYTHONPATH="$E2E_HOME/site:$PWD" timeout $t python -m runners.bench_eval $args out=/tmp/runs/$which \
      2>&1 | grep -v "SyntaxWarning\|__logo__" | tail -4)
  cp /tmp/runs/$which/bench_eval.json "$out/bench_eval_${which}_loop.json"
  t=230
done
} 2>&1 | tee "$out/session.log"
