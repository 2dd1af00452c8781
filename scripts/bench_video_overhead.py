"""What recording costs: the same episodes with videos=all and videos=none (CPU, real LIBERO).

    python scripts/bench_video_overhead.py [episodes] [max_steps]

Runs the zero policy on libero_spatial task 0 (2 cameras at 256 px, as openpi), one environment in
a worker process, alternating the two settings so drift in machine load hits both equally, and
prints the wall time per environment step of each and the difference.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from runners.evaluate import evaluate

CONF = Path(__file__).resolve().parents[1] / "conf"


def run(videos: str, init_state: int, max_steps: int) -> tuple[float, int]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "policy=zero", "tasks=[0]", f"init_states=[{init_state}]", f"max_steps={max_steps}", f"videos={videos}"])
    with tempfile.TemporaryDirectory() as out:
        evaluate(cfg, out)
        rec = json.loads((Path(out) / "results.jsonl").read_text().splitlines()[0])
        return rec["wall_s"], rec["env_steps"]


def main(episodes: int = 4, max_steps: int = 60) -> None:
    totals = {"all": [0.0, 0], "none": [0.0, 0]}
    for k in range(episodes):
        for videos in ("all", "none") if k % 2 == 0 else ("none", "all"):
            wall, steps = run(videos, k, max_steps)
            totals[videos][0] += wall
            totals[videos][1] += steps
    per = {v: 1000 * t / n for v, (t, n) in totals.items()}
    print(f"per env step: videos=all {per['all']:.1f} ms, videos=none {per['none']:.1f} ms, "
          f"overhead {per['all'] - per['none']:+.1f} ms ({100 * (per['all'] / per['none'] - 1):+.1f}%) "
          f"over {episodes} episodes of {max_steps} steps each setting")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
