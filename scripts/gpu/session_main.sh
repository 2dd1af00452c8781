#!/usr/bin/env bash
# GPU session 2 (nvidia-h200, right after session 1): the main job, timed. Pi0.5 (random weights, compile)
# on libero_spatial with NUM_ENVS simulators, videos off, for at most LIMIT seconds of episodes, then the
# serial loop on 2 episodes (runners/bench_eval.py); then the scripted expert on 16 envs (episodes end at
# different ticks: does a reset stall the pool?).
#   run(command="NUM_ENVS=16 bash scripts/gpu/session_main.sh", carry=[".e2e", ".COMMIT"])
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/setup_device.sh
out=${OUT:-/tmp/out}; mkdir -p "$out"
n=${NUM_ENVS:-16}; limit=${LIMIT:-400}
{
echo "[session] commit $(cat .COMMIT 2>/dev/null) num_envs=$n limit=${limit}s"
timeout 520 python -m runners.bench_eval policy=pi05 policy.checkpoint=random backend=compile suite=libero_spatial \
    num_envs=$n videos=none serial_episodes=2 time_limit_s=$limit out=/tmp/runs/main
cp /tmp/runs/main/bench_eval.json "$out/bench_eval_main.json"
timeout 60 python -m runners.bench_eval policy=scripted suite=libero_spatial num_envs=16 videos=none \
    serial_baseline=false time_limit_s=35 out=/tmp/runs/scripted
cp /tmp/runs/scripted/bench_eval.json "$out/bench_eval_scripted.json"
tar -czf "$out/runs.tgz" -C /tmp/runs --exclude='*.mp4' .
} 2>&1 | tee "$out/session.log"
