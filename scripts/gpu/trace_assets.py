"""Build every task of some LIBERO suites and reset it once, so that a tracer can record which asset
files the scenes open. Run under strace by scripts/gpu/trace_assets.sh, which turns the trace into
scripts/gpu/asset_files.txt (the files build_bundle.sh puts in the trimmed LIBERO tree).

    python scripts/gpu/trace_assets.py libero_spatial libero_object

MuJoCo reads meshes and textures from C (fopen), so patching Python's `open` would miss them; a
system-call trace sees both. Cameras stay on: rendering opens no file, but it is the configuration
the runners use, and a reset with cameras builds the same model as one without.
"""

from __future__ import annotations

import sys
import time

from envs.libero import LiberoEnv
from envs.suites import get_suite


def main(suites: list[str]) -> None:
    for name in suites:
        suite = get_suite(name)
        env = LiberoEnv(suite=name, task_id=0, camera_size=64, image_size=64, settle_steps=1, max_steps=5)
        for task_id in range(suite.num_tasks):
            t = time.time()
            env.reset(options={"task_id": task_id, "init_state_id": 0})
            env.step([0.0] * 7)
            print(f"[trace] {name} task {task_id}: {env.task!r} ({time.time() - t:.1f} s)", flush=True)
        env.close()


if __name__ == "__main__":
    main(sys.argv[1:] or ["libero_spatial", "libero_object"])
