"""Paired comparisons: two evaluations run on the same episodes, compared episode by episode.

    python -m runners.compare RUN_A RUN_B          # any two run directories
    python -m runners.compare RUN_A RUN_B --json   # the same as JSON

Every job of a sweep runs the same (suite, task, init state, seed) episodes, so two configurations
can be compared on matched episodes rather than as two independent samples: episodes are matched by
their key, error episodes are left out of both sides (an error says nothing about success), and
episodes without a partner are counted as unpaired. On the pairs: both success rates, the discordant
counts (A-only and B-only successes), the exact McNemar p-value and the difference B - A with its
95% interval by Newcombe's method 10 (runners/stats.py has the formulas and references).

In a sweep, every two jobs whose resolved configs (summary.json) differ in exactly one setting that
decides results (runners.rundir.NOT_HASHED are ignored; `env.max_steps` and its like, which only
mirror a top-level setting, are not counted twice; a different policy class is one setting,
`policy`) are compared; runners/aggregate.py writes them to sweep.md and sweep.json, and
runners/review.py shows them with the discordant episodes' videos side by side.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path
from typing import Any

from runners.rundir import policy_label, read_records, read_summary, result_settings, sweep_runs
from runners.stats import PAIRED_CI_METHOD, PAIRED_TEST, mcnemar_exact, paired_difference_ci

KEY_FIELDS = ("suite", "task_id", "init_state_id", "seed")


# ----- which settings differ ----------------------------------------------------------------------------

def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def setting_differences(summary_a: dict[str, Any], summary_b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (value in A, value in B)} for the result-deciding settings of two summaries' configs."""
    fa = _flatten(result_settings(summary_a.get("config") or {}))
    fb = _flatten(result_settings(summary_b.get("config") or {}))
    diffs = {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}
    for k in list(diffs):
        leaf = k.rsplit(".", 1)[-1]
        # env.max_steps: ${max_steps} and its like repeat a top-level setting; count that one only
        if "." in k and leaf in diffs and fa.get(k) == fa.get(leaf) and fb.get(k) == fb.get(leaf):
            del diffs[k]
    if "policy._target_" in diffs:  # another policy altogether: its own settings differ with it
        for k in [k for k in diffs if k.startswith("policy.")]:
            del diffs[k]
        diffs["policy"] = (policy_label(summary_a), policy_label(summary_b))
    return diffs


# ----- the comparison ---------------------------------------------------------------------------------

def compare_records(recs_a: dict[tuple, dict[str, Any]], recs_b: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    """The paired comparison of two runs' records ({episode key: result line}); B - A differences."""
    valid_a = {k: r for k, r in recs_a.items() if not r.get("error")}
    valid_b = {k: r for k, r in recs_b.items() if not r.get("error")}
    keys = sorted(valid_a.keys() & valid_b.keys())
    counts = {"both": 0, "a_only": 0, "b_only": 0, "neither": 0}
    discordant = []
    for k in keys:
        a, b = bool(valid_a[k]["success"]), bool(valid_b[k]["success"])
        side = "both" if a and b else "a_only" if a else "b_only" if b else "neither"
        counts[side] += 1
        if side in ("a_only", "b_only"):
            discordant.append({**dict(zip(KEY_FIELDS, k)), "success": "a" if a else "b"})
    n = len(keys)
    diff = paired_difference_ci(counts["both"], counts["b_only"], counts["a_only"], counts["neither"])
    return {
        "paired": n,
        "a_success_rate": (counts["both"] + counts["a_only"]) / n if n else None,
        "b_success_rate": (counts["both"] + counts["b_only"]) / n if n else None,
        **counts,
        "unpaired_a": len(valid_a) - n,
        "unpaired_b": len(valid_b) - n,
        "errors_a": len(recs_a) - len(valid_a),
        "errors_b": len(recs_b) - len(valid_b),
        "mcnemar_p": mcnemar_exact(counts["a_only"], counts["b_only"]) if n else None,
        "difference": diff[0] if diff else None,
        "ci95": [diff[1], diff[2]] if diff else [None, None],
        "method": PAIRED_CI_METHOD,
        "test": PAIRED_TEST,
        "discordant": discordant,
    }


def compare_runs(run_a: str | Path, run_b: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """Compare two run directories (named relative to `root` when given)."""
    run_a, run_b = Path(run_a), Path(run_b)
    sa, sb = read_summary(run_a) or {}, read_summary(run_b) or {}
    name = (lambda p: str(p.relative_to(root)) if root is not None else str(p))
    return {
        "a": name(run_a),
        "b": name(run_b),
        "differences": {k: list(v) for k, v in setting_differences(sa, sb).items()} if sa and sb else None,
        **compare_records(read_records(run_a)[0], read_records(run_b)[0]),
    }


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def _order(value: Any):
    """Sort key that puts numbers in numeric order and before anything else."""
    return (0, float(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0.0, str(value))


# Settings that decide which episodes run rather than how: jobs differing in one of them share no episode.
EPISODE_SETTINGS = ("suite", "seed")


def sweep_comparisons(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every pair of the sweep's jobs that differ in exactly one result-deciding setting, compared; A is
    the job with the lower value of that setting."""
    root = Path(sweep_dir)
    jobs = [(run, read_summary(run)) for run in sorted(sweep_runs(root)[0], key=_natural)]  # current jobs only
    out = []
    for i, (run_1, s1) in enumerate(jobs):
        for run_2, s2 in jobs[i + 1:]:
            diffs = setting_differences(s1, s2)
            if len(diffs) != 1:
                continue
            (setting, (v1, v2)), = diffs.items()
            if setting in EPISODE_SETTINGS:
                continue  # other episodes (another suite or seed): nothing to pair
            (a, va), (b, vb) = sorted([(run_1, v1), (run_2, v2)], key=lambda rv: _order(rv[1]))
            comparison = compare_runs(a, b, root)
            if comparison["paired"] == 0:
                continue  # no episode in common (other tasks or init states): a row of dashes says nothing
            out.append({"setting": setting, "a_value": va, "b_value": vb, **comparison})
    return out


# ----- renderings -------------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _p(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3g}" if x >= 0.001 else f"{x:.1e}")


def difference_text(c: dict[str, Any]) -> str:
    """`+15.0 [-1.2, +30.1]`: B - A in percentage points with its 95% interval."""
    if c["difference"] is None:
        return "-"
    lo, hi = c["ci95"]
    return f"{100 * c['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def short_name(job: str) -> str:
    """`job3` for a sweep job directory `job3_steps=1,backend=eager` (its overrides are in the setting
    column already); other names unchanged."""
    m = re.fullmatch(r"(job\d+)_.*", job)
    return m.group(1) if m else job


COLUMNS: list[tuple[str, Any]] = [
    ("setting", lambda c: f"{c['setting']}: {c['a_value']} → {c['b_value']}"),
    ("A", lambda c: short_name(c["a"])),
    ("B", lambda c: short_name(c["b"])),
    ("A success %", lambda c: _pct(c["a_success_rate"])),
    ("B success %", lambda c: _pct(c["b_success_rate"])),
    ("paired", lambda c: c["paired"]),
    ("unpaired A/B", lambda c: f"{c['unpaired_a']}/{c['unpaired_b']}"),
    ("A only", lambda c: c["a_only"]),
    ("B only", lambda c: c["b_only"]),
    ("McNemar p", lambda c: _p(c["mcnemar_p"])),
    ("B − A, points (95% CI)", difference_text),
]

NOTE = (f"Paired on episodes (suite, task, init state, seed) that ran without error in both jobs. "
        f"p: {PAIRED_TEST}. CI: {PAIRED_CI_METHOD}.")


def markdown_table(comparisons: list[dict[str, Any]]) -> str:
    if not comparisons:
        return "No two jobs differ in exactly one setting.\n"
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for c in comparisons:
        lines.append("| " + " | ".join(str(cell(c)) for _, cell in COLUMNS) + " |")
    return "\n".join(lines) + f"\n\n{NOTE}\n"


def html_table(comparisons: list[dict[str, Any]]) -> str:
    if not comparisons:
        return "<p>No two jobs differ in exactly one setting.</p>"
    def td(header: str, c: dict[str, Any], cell) -> str:
        text = html.escape(str(cell(c)))
        if header in ("A", "B"):  # a link to the job's section of the review page, its full name on hover
            job = c[header.lower()]
            return f'<td><a href="#{html.escape(short_name(job))}" title="{html.escape(job)}">{text}</a></td>'
        return f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in COLUMNS)
    rows = ["<tr>" + "".join(td(h, c, cell) for h, cell in COLUMNS) + "</tr>" for c in comparisons]
    return f'<table class="paired"><tr>{head}</tr>' + "".join(rows) + f'</table><p class="note">{html.escape(NOTE)}</p>'


def text_report(c: dict[str, Any]) -> str:
    diffs = c.get("differences")
    if diffs is None:
        differ = "unknown (a run without summary.json)"
    elif not diffs:
        differ = "nothing that decides results"
    else:
        differ = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diffs.items())
    lines = [
        f"A: {c['a']}",
        f"B: {c['b']}",
        f"settings that differ: {differ}",
        f"paired episodes: {c['paired']} (unpaired: {c['unpaired_a']} only in A, {c['unpaired_b']} only in B; "
        f"error episodes left out: {c['errors_a']} in A, {c['errors_b']} in B)",
        f"success on the paired episodes: A {_pct(c['a_success_rate'])}%, B {_pct(c['b_success_rate'])}%",
        f"discordant: A only {c['a_only']}, B only {c['b_only']} (both {c['both']}, neither {c['neither']}); "
        f"{c['test']}: p = {_p(c['mcnemar_p'])}",
        f"difference B - A: {difference_text(c)} percentage points, 95% CI by {c['method']}",
    ]
    if c["discordant"]:
        lines.append("discordant episodes:")
        lines += [f"  {d['suite']} task {d['task_id']} init state {d['init_state_id']} seed {d['seed']}: "
                  f"succeeded only in {d['success'].upper()}" for d in c["discordant"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="run directory A (holding results.jsonl)")
    parser.add_argument("b", help="run directory B")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = parser.parse_args(argv)
    for d in (args.a, args.b):
        if not (Path(d) / "results.jsonl").is_file():
            parser.error(f"{d} holds no results.jsonl: point at an evaluation directory (a sweep's job)")
    c = compare_runs(args.a, args.b)
    print(json.dumps(c, indent=2) if args.json else text_report(c))


if __name__ == "__main__":
    main(sys.argv[1:])
