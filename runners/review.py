"""A self-contained failure review page for an evaluation or a sweep directory.

    python -m runners.review DIR       # writes DIR/review.html

The page uses only relative links and inline CSS (no network, no scripts): the sweep plot and table
when DIR is a sweep, then for every evaluation under DIR its success table per task (Wilson 95%
CIs) and a gallery of its failed and errored episodes, grouped by task, each video playable inline
with its init state, steps and policy latency (successful episodes that kept a video are listed,
folded, below).  It reads what the runner wrote (results.jsonl and
summary.json, through runners/rundir.py) and knows nothing about policies.
"""

from __future__ import annotations

import argparse
import csv
import html
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from runners.rundir import find_runs, policy_label, read_records, read_summary, summarize, upgrade_summary
from runners.tables import html_table, num

PAGE = "review.html"

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 18px 0 6px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
.config { font-family: ui-monospace, monospace; font-size: 12px; color: #555; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 464px; }
.card video { width: 448px; display: block; background: #000; }
.card .meta { font-size: 12px; margin-top: 4px; }
.card pre { font-size: 11px; white-space: pre-wrap; max-height: 120px; overflow: auto; background: #fee; }
.outcome-failure { color: #b22; } .outcome-error { color: #c70; } .outcome-success { color: #282; }
details { margin: 12px 0; } summary { cursor: pointer; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #ddd; background: #fff; }
"""


def _config_line(summary: dict[str, Any]) -> str:
    cfg = summary.get("config", {})
    keys = [("policy", policy_label(summary)), ("suite", cfg.get("suite")), ("steps", cfg.get("steps")),
            ("backend", cfg.get("backend")), ("replan", cfg.get("replan")), ("chunking", cfg.get("chunking"))]
    return "  ".join(f"{k}={v}" for k, v in keys if v is not None) + f"  [config {summary.get('config_hash', '?')}]"


def _gallery(eval_dir: Path, root: Path, records: list[dict[str, Any]]) -> tuple[str, int]:
    failures = [r for r in records if r.get("error") or not r.get("success")]
    if not failures:
        return "<p>No failures.</p>", 0
    return _cards(eval_dir, root, failures, "failed")


def _successes(eval_dir: Path, root: Path, records: list[dict[str, Any]]) -> str:
    """Successful episodes that kept a video (videos=all), folded away below the failures."""
    kept = [r for r in records if r.get("success") and not r.get("error") and r.get("video")
            and (eval_dir / r["video"]).is_file()]
    if not kept:
        return ""
    cards, _ = _cards(eval_dir, root, kept, "succeeded")
    return f"<details><summary>Successful episodes with videos ({len(kept)})</summary>\n{cards}\n</details>"


def _cards(eval_dir: Path, root: Path, chosen: list[dict[str, Any]], verb: str) -> tuple[str, int]:
    by_task: dict[tuple, list] = defaultdict(list)
    for r in chosen:
        by_task[(r["suite"], r["task_id"], r.get("task", ""))].append(r)
    parts, videos = [], 0
    for (suite, tid, text), recs in sorted(by_task.items()):
        parts.append(f"<h3>{html.escape(suite)} task {tid}: {html.escape(text)} ({len(recs)} {verb})</h3>")
        parts.append('<div class="gallery">')
        for r in sorted(recs, key=lambda r: r["init_state_id"]):
            outcome = "error" if r.get("error") else ("success" if r.get("success") else "failure")
            card = ['<div class="card">']
            video = r.get("video")
            if video and (eval_dir / video).is_file():
                src = os.path.relpath(eval_dir / video, root)
                card.append(f'<video controls muted preload="metadata" src="{html.escape(src)}"></video>')
                videos += 1
            elif video:
                card.append(f"<p>video missing: {html.escape(video)}</p>")
            card.append(
                f'<div class="meta"><b class="outcome-{outcome}">{outcome}</b> &middot; init state {r["init_state_id"]}'
                f' &middot; seed {r["seed"]} &middot; {r.get("env_steps")} env steps &middot; latency p50'
                f' {num(r.get("latency_p50_ms"))} ms, p95 {num(r.get("latency_p95_ms"))} ms</div>')
            if r.get("error"):
                card.append(f"<pre>{html.escape(str(r['error']))}</pre>")
            card.append("</div>")
            parts.append("".join(card))
        parts.append("</div>")
    return "\n".join(parts), videos


def _cell(column: str, value: str) -> str:
    """sweep.csv holds raw numbers; show rates as percentages and times to 0.1 ms."""
    try:
        x = float(value)
    except ValueError:
        return value
    if column in ("success_rate", "ci95_low", "ci95_high"):
        return f"{100 * x:.1f}%"
    if column.endswith("_ms"):
        return f"{x:.1f}"
    return value


def _sweep_section(root: Path) -> str:
    parts = []
    if (root / "sweep.png").is_file():
        parts.append('<h2>Sweep</h2><img class="plot" src="sweep.png" alt="success and latency vs denoising steps">')
    if (root / "sweep.csv").is_file():
        with open(root / "sweep.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows:
            head, body = rows[0], rows[1:]
            cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
            lines = [f"<table><tr>{cells}</tr>"]
            for row in body:
                lines.append("<tr>" + "".join(f"<td>{html.escape(_cell(k, v))}</td>" for k, v in zip(head, row)) + "</tr>")
            parts.append("".join(lines) + "</table>")
    return "\n".join(parts)


def write_review(root: str | os.PathLike) -> Path:
    """Write `root`/review.html and return its path."""
    root = Path(root)
    body = [f"<h1>Rollout review: {html.escape(root.name)}</h1>", _sweep_section(root)]
    for eval_dir in find_runs(root):
        records = list(read_records(eval_dir)[0].values())
        summary = read_summary(eval_dir)
        # a run still in progress has no summary yet: summarize what is there
        summary = upgrade_summary(summary) if summary is not None else summarize(records)
        title = os.path.relpath(eval_dir, root)
        body.append(f"<h2>{html.escape('evaluation' if title == '.' else title)}</h2>")
        body.append(f'<div class="config">{html.escape(_config_line(summary))}</div>')
        body.append(html_table(summary))
        gallery, _ = _gallery(eval_dir, root, records)
        body.append(gallery)
        body.append(_successes(eval_dir, root, records))
    page = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>Review: {html.escape(root.name)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )
    out = root / PAGE
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="an evaluation or sweep directory")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        parser.error(f"{root} is not a directory")
    if not find_runs(root):
        parser.error(f"no results.jsonl under {root}: point at an evaluation or sweep directory")
    print(write_review(root))


if __name__ == "__main__":
    main()
