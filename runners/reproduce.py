"""Does a run reproduce a published LIBERO table? Success per suite against the published rate, with
an exact test, a verdict and its power, and every way the run's protocol differs from the paper's.

    python -m runners.reproduce RUN_OR_SWEEP_DIR                        # against openpi's pi05_libero
    python -m runners.reproduce DIR --table pi0_libero_openpi --alpha 0.05
    python -m runners.reproduce DIR --published my_table.json           # a table of your own

For each evaluation under DIR and each suite the published table has: our success and its Wilson
95% CI next to the published rate; the two-sided exact binomial test of "our episodes succeed at the
published rate" (scipy.stats.binomtest); the verdict `consistent` (p >= alpha), else `below` or
`above`; and the test's power to detect a true rate 2 points under the published one at our number
of episodes (exact, from the binomial distribution: what the verdict can and cannot tell). Then the
protocol the run used (seed, settle steps, max steps per suite, replan and chunking, execution,
init states, camera and image sizes, image orientation, MuJoCo version) checked against the paper's
(runners/published/libero.json), every difference listed: that is where failed reproductions come
from. Writes reproduce.md and reproduce.json in DIR and prints the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from scipy import stats

from runners.rundir import find_runs, policy_label, read_summary, sweep_runs, upgrade_summary, write_json
from runners.stats import wilson_interval

PUBLISHED = Path(__file__).resolve().parent / "published" / "libero.json"
DEFAULT_TABLE = "pi05_libero_openpi"
DROP = 0.02  # the drop whose detection power is reported


def load_published(path: str | Path = PUBLISHED) -> dict[str, Any]:
    """A JSON file of published tables, checked: a table file of one's own is hand-written."""
    fmt = f"(see {PUBLISHED} for the format)"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a JSON table file ({exc}) {fmt}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tables"), dict) or not data["tables"]:
        raise ValueError(f"{path}: no 'tables' of published results {fmt}")
    for name, table in data["tables"].items():
        rates = table.get("success") if isinstance(table, dict) else None
        if not isinstance(rates, dict) or not rates or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in rates.values()):
            raise ValueError(f"{path}: table {name!r} needs 'success': {{suite: rate in [0, 1]}} {fmt}")
        per_task = table.get("episodes_per_task", 1)
        if not isinstance(per_task, int) or isinstance(per_task, bool) or per_task < 1:
            raise ValueError(f"{path}: table {name!r}: episodes_per_task must be a whole number >= 1, got {per_task!r}")
    if not isinstance(data.get("protocol") or {}, dict):
        raise ValueError(f"{path}: 'protocol' must be an object of settings {fmt}")
    return data


@lru_cache(maxsize=4096)
def _pvalue(k: int, n: int, p: float) -> float:
    return float(stats.binomtest(k, n, p, alternative="two-sided").pvalue)


def power(n: int, published: float, alpha: float, drop: float = DROP) -> float | None:
    """Probability that the exact two-sided test at `alpha` rejects the published rate when the true
    rate is `drop` below it, with n episodes."""
    true = published - drop
    if n == 0 or true <= 0:
        return None
    rejected = [k for k in range(n + 1) if _pvalue(k, n, published) < alpha]
    return float(sum(stats.binom.pmf(k, n, true) for k in rejected))


def verdict(successes: int, n: int, published: float, alpha: float) -> dict[str, Any]:
    if n == 0:
        return {"verdict": "no episodes", "p_value": None, "power_2pt_drop": None}
    p = _pvalue(successes, n, published)
    if p >= alpha:
        word = "consistent"
    else:
        word = "below" if successes / n < published else "above"
    return {"verdict": word, "p_value": p, "power_2pt_drop": power(n, published, alpha)}


def protocol_differences(summary: dict[str, Any], protocol: dict[str, Any]) -> list[str]:
    """Every way the run's settings differ from the published protocol, in words."""
    cfg = summary.get("config", {})
    env = cfg.get("env", {}) or {}
    suite = cfg.get("suite")
    out = []

    def differ(what: str, ours, theirs, why: str = ""):
        if ours != theirs:
            out.append(f"{what}: this run {ours!r}, the paper {theirs!r}{' (' + why + ')' if why else ''}")

    differ("seed", cfg.get("seed"), protocol["seed"], "the seed moves objects even with fixed init states")
    differ("settle steps", env.get("settle_steps", cfg.get("settle_steps")), protocol["settle_steps"])
    limit = env.get("max_steps") or cfg.get("max_steps")
    if limit is not None and suite in protocol["max_steps"]:
        differ(f"max steps ({suite})", limit, protocol["max_steps"][suite])
    differ("replan", cfg.get("replan"), protocol["replan"])
    differ("chunking", cfg.get("chunking"), protocol["chunking"])
    differ("execution", cfg.get("execution", "sync"), protocol["execution"])
    differ("camera size", env.get("camera_size"), protocol["camera_size"])
    differ("image size", env.get("image_size"), protocol["image_size"])
    images = (cfg.get("policy") or {}).get("images", "upright")
    differ("image orientation", images, protocol["images"], "openpi trained on frames rotated 180 degrees")
    tasks = summary.get("tasks", [])
    episodes = {t["task_id"]: t["episodes"] + t["errors"] for t in tasks}
    short = {t: n for t, n in episodes.items() if n != protocol["episodes_per_task"]}
    if short:
        counts = sorted(set(short.values()))
        ours = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        out.append(f"init states: {ours} episodes per task in this run, the paper "
                   f"{protocol['episodes_per_task']} ({protocol['init_states']})")
    if cfg.get("init_states") is not None:
        out.append(f"init states chosen explicitly ({cfg['init_states']}), the paper {protocol['init_states']}")
    if cfg.get("tasks") is not None:
        out.append(f"tasks: only {list(cfg['tasks'])} of the suite, the paper every task")
    seeds = cfg.get("seeds")
    if seeds is not None and list(seeds) != [protocol["seed"]]:
        out.append(f"seeds: this run {list(seeds)}, the paper {protocol['seed']} alone")
    perturb = summary.get("perturb", "none")
    if perturb != "none":
        sev = ", ".join(f"{k} {v:g}" for k, v in sorted((summary.get("severity") or {}).items()))
        out.append(f"perturbation: this run {perturb}{f' (severity {sev})' if sev else ''}, the paper none")
    if env.get("cameras") is False:
        out.append("cameras off (env.cameras=false): the policy saw black images, the paper rendered both views")
    latency = cfg.get("latency_ms", 0)
    if cfg.get("execution", "sync") != "sync" and latency not in (0, 0.0, None):
        out.append(f"latency: {latency} ms while the simulator kept moving, the paper none (it waited)")
    mujoco = ((summary.get("provenance") or {}).get("versions") or {}).get("mujoco")
    differ("MuJoCo", mujoco, protocol["mujoco"], "physics, and so success rates, move with the MuJoCo version")
    for t in tasks:
        if t.get("errors"):
            out.append(f"{t['errors']} error episode(s) in {t['suite']} task {t['task_id']} (not counted)")
    return out


def report(root: str | Path, table: str = DEFAULT_TABLE, alpha: float = 0.05,
           published_path: str | Path = PUBLISHED) -> dict[str, Any]:
    data = load_published(published_path)
    if table not in data["tables"]:
        raise ValueError(f"no published table {table!r} in {published_path}; tables: {', '.join(data['tables'])}")
    ref = data["tables"][table]
    # A table file of one's own may leave out the protocol or parts of it: openpi's fills the rest. A
    # table's own episodes per task (lerobot's 10) is what its runs are held to.
    protocol = {**load_published(PUBLISHED)["protocol"], **(data.get("protocol") or {})}
    if "episodes_per_task" in ref:
        protocol["episodes_per_task"] = ref["episodes_per_task"]
    root = Path(root)
    # the run at root, and a sweep's jobs whose summaries are current (not a failed job's old numbers)
    runs = [r for r in find_runs(root) if r == root and read_summary(r) is not None] + sweep_runs(root)[0]
    if not runs:
        raise FileNotFoundError(f"no evaluation with a summary.json under {root}: point at a run or sweep directory")
    rows, protocols = [], {}
    for run in runs:
        summary = upgrade_summary(read_summary(run))
        name = "." if run == root else str(run.relative_to(root))
        protocols[name] = protocol_differences(summary, protocol)
        for suite, s in summary.get("suites", {}).items():
            if suite not in ref["success"]:
                continue
            k, n = s["successes"], s["episodes"]
            lo, hi = wilson_interval(k, n)
            rows.append({"run": name, "policy": policy_label(summary), "suite": suite, "successes": k, "episodes": n,
                         "success_rate": k / n if n else None, "ci95": [lo, hi], "published": ref["success"][suite],
                         **verdict(k, n, ref["success"][suite], alpha)})
    result = {"table": table, "reference": {k: v for k, v in ref.items() if k != "success"}, "alpha": alpha,
              "drop_for_power": DROP, "rows": rows, "protocol_differences": protocols}
    write_json(root / "reproduce.json", result)
    (root / "reproduce.md").write_text(markdown(result), encoding="utf-8")
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(result: dict[str, Any]) -> str:
    ref = result["reference"]
    lines = [f"Reproduction check against `{result['table']}`: {ref.get('model', '')} ({ref.get('source', '')}; "
             f"{ref.get('date', '')}). Exact two-sided binomial test at alpha = {result['alpha']}; power = chance "
             f"of a `below` verdict if the true rate were {100 * result['drop_for_power']:.0f} points under the "
             f"published one.", "",
             "| run | policy | suite | ours % | 95% CI | episodes | published % | p | verdict | power (-2 pt) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["ci95"]
        p = "-" if r["p_value"] is None else f"{r['p_value']:.3g}"
        pw = "-" if r["power_2pt_drop"] is None else f"{100 * r['power_2pt_drop']:.0f}%"
        lines.append(f"| {r['run']} | {r['policy']} | {r['suite']} | {_pct(r['success_rate'])} | [{100 * lo:.1f}, "
                     f"{100 * hi:.1f}] | {r['episodes']} | {_pct(r['published'])} | {p} | **{r['verdict']}** | {pw} |")
    lines.append("")
    for run, diffs in result["protocol_differences"].items():
        lines.append(f"Protocol of `{run}`: " + ("as the paper's." if not diffs else "differs from the paper's:"))
        lines += [f"- {d}" for d in diffs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="an evaluation or sweep directory")
    p.add_argument("--table", default=DEFAULT_TABLE, help=f"published table to compare with (default {DEFAULT_TABLE})")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--published", default=str(PUBLISHED), help="a JSON file of published tables (format: the default)")
    args = p.parse_args(argv)
    if not 0 < args.alpha < 1:
        p.error("--alpha must be between 0 and 1")
    try:
        result = report(args.dir, args.table, args.alpha, args.published)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:  # a hand-edited summary or table file
        p.error(f"a summary.json under {args.dir} or {args.published} is not in the expected form ({exc!r}); "
                f"rebuild summaries with python -m runners.evaluate out=RUN (it resumes, running nothing new)")
    print(markdown(result))
    print(f"Written: {Path(args.dir) / 'reproduce.md'}, {Path(args.dir) / 'reproduce.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
