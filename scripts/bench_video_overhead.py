"""What recording costs: the same episodes with videos=all and videos=none (CPU, real LIBERO),
including the encoder's tail after the episode ends.

    python scripts/bench_video_overhead.py [episodes] [max_steps] [--render on_demand|every_step] [--json PATH]

Runs the zero policy on libero_spatial task 0 (2 cameras at 256 px, as openpi), one environment in
a worker process, alternating the two settings so drift in machine load hits both equally. Per
episode it takes:
  * `wall_s` of its result line: the episode itself, from its start to its last step;
  * the tail: from the episode's end (the loop hands its video to `VideoRecorder.finish`) to its
    result line being written (`Progress.update`, called right after the line is appended), which
    for a recorded episode waits until ffmpeg has encoded the queued frames and the outcome banner,
    finished the file and it was renamed to its final name (runners/loop.py writes the line only then).
It prints the per-step cost during the episode and per episode with the tail, and writes a JSON.

With the default `render=on_demand` the zero policy looks at no image, so videos=none renders no
camera at all and the difference is the whole price of recording: rendering both cameras every step
plus encoding. `--render every_step` renders them either way and isolates the encoder's share.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from runners.evaluate import evaluate  # noqa: E402
from runners.progress import Progress  # noqa: E402
from videos.recorder import VideoRecorder  # noqa: E402

CONF = REPO / "conf"
_marks: list[tuple[str, float]] = []


def _mark(kind: str, fn):
    def wrapped(self, *args, **kwargs):
        _marks.append((kind, time.monotonic()))
        return fn(self, *args, **kwargs)
    return wrapped


VideoRecorder.finish = _mark("end", VideoRecorder.finish)  # the episode's last step is done
Progress.update = _mark("written", Progress.update)  # its result line is in results.jsonl


def run(videos: str, init_state: int, max_steps: int, render: str = "on_demand") -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "policy=zero", "tasks=[0]", f"init_states=[{init_state}]", f"max_steps={max_steps}", f"videos={videos}",
            f"render={render}"])
    _marks.clear()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.monotonic()
        evaluate(cfg, out)
        total = time.monotonic() - t0
        rec = json.loads((Path(out) / "results.jsonl").read_text().splitlines()[0])
        files = list((Path(out) / "videos").rglob("*.mp4")) if videos != "none" else []
    (end_kind, end), (written_kind, written) = _marks
    assert (end_kind, written_kind) == ("end", "written") and not rec["error"], (_marks, rec)
    assert len(files) == (videos == "all") and (rec["video"] is not None) == (videos == "all"), (files, rec)
    return {"wall_s": rec["wall_s"], "env_steps": rec["env_steps"], "tail_s": written - end, "evaluate_s": total}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(),
            "load_average_1_5_15": os.getloadavg()}  # other jobs on the machine (at the end of the run)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("episodes", nargs="?", type=int, default=4)
    p.add_argument("max_steps", nargs="?", type=int, default=60)
    p.add_argument("--render", default="on_demand", choices=["on_demand", "every_step"])
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {"all": [], "none": []}
    for k in range(args.episodes):
        for videos in ("all", "none") if k % 2 == 0 else ("none", "all"):
            r = run(videos, k, args.max_steps, args.render)
            runs[videos].append(r)
            print(f"episode {k} videos={videos}: {r['env_steps']} steps in {r['wall_s']:.2f} s, "
                  f"tail {r['tail_s']:.3f} s", flush=True)
    out = {"command": "python scripts/bench_video_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine(), "episodes": args.episodes, "max_steps": args.max_steps, "render": args.render}
    for v, rs in runs.items():
        steps = sum(r["env_steps"] for r in rs)
        out[v] = {"ms_per_step": 1000 * sum(r["wall_s"] for r in rs) / steps,
                  "tail_s_mean": sum(r["tail_s"] for r in rs) / len(rs),
                  "tail_s_max": max(r["tail_s"] for r in rs),
                  "ms_per_step_with_tail": 1000 * sum(r["wall_s"] + r["tail_s"] for r in rs) / steps,
                  "episodes": rs}
    a, n = out["all"], out["none"]
    out["overhead_ms_per_step"] = a["ms_per_step"] - n["ms_per_step"]
    out["overhead_ms_per_step_with_tail"] = a["ms_per_step_with_tail"] - n["ms_per_step_with_tail"]
    out["tail_s_added"] = a["tail_s_mean"] - n["tail_s_mean"]
    print(f"during the episode, per env step: videos=all {a['ms_per_step']:.1f} ms, videos=none "
          f"{n['ms_per_step']:.1f} ms, overhead {out['overhead_ms_per_step']:+.1f} ms "
          f"({100 * (a['ms_per_step'] / n['ms_per_step'] - 1):+.1f}%)")
    print(f"after the episode, until its result line is written: videos=all {a['tail_s_mean']:.3f} s "
          f"(max {a['tail_s_max']:.3f}), videos=none {n['tail_s_mean']:.3f} s")
    print(f"episode start to result line, per env step: videos=all {a['ms_per_step_with_tail']:.1f} ms, "
          f"videos=none {n['ms_per_step_with_tail']:.1f} ms, overhead {out['overhead_ms_per_step_with_tail']:+.1f} ms "
          f"({100 * (a['ms_per_step_with_tail'] / n['ms_per_step_with_tail'] - 1):+.1f}%) "
          f"over {args.episodes} episodes of {args.max_steps} steps each setting, render={args.render}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
