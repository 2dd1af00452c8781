"""A self-contained review page for an evaluation or a sweep directory.

    python -m runners.review DIR       # writes DIR/review.html

One HTML file with relative links, inline CSS and one small inline script (no network): the sweep
plot and table when DIR is a sweep; the paired comparisons of every two jobs that differ in one
setting (runners/compare.py) and, for each, the episodes that succeeded in one job and failed in the
other with both videos side by side under one play/pause/seek control (then, folded, the episodes
that failed in both); then for every evaluation under DIR its success table per task (Wilson 95%
CIs), its failure tags per task (runners/triage.py) and its failed and errored episodes grouped by
tag, with a filter by tag at the top of the page. Successful episodes that kept a video are listed,
folded, below. Videos load lazily: `preload="none"` and no `src` until the video scrolls near the
viewport (an IntersectionObserver sets it), so a page of thousands of episodes opens at once. It
reads what the runner wrote (through runners/rundir.py) and knows nothing about policies.
"""

from __future__ import annotations

import argparse
import csv
import html
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from runners.compare import html_table as paired_table
from runners.compare import short_name, sweep_comparisons
from runners.rundir import (episode_key, find_runs, not_current, policy_label, read_records, read_summary, read_traces, summarize,
                            upgrade_summary)
from runners.tables import html_table, num
from runners.triage import TAGS

PAGE = "review.html"
MAX_BOTH_FAILED = 50  # per comparison: episodes that failed in both jobs shown side by side (folded)

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 18px 0 6px; } h4 { font-size: 14px; margin: 12px 0 6px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #eee; } td.text, th.text { text-align: left; }
table.paired td:nth-child(-n+3) { text-align: left; }
.note { font-size: 12px; color: #555; }
.config { font-family: ui-monospace, monospace; font-size: 12px; color: #555; }
.warning { background: #fff3cd; border: 1px solid #e0c36a; padding: 4px 8px; margin: 4px 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 464px; }
.card video, .pair video { width: 448px; height: 272px; display: block; background: #000; }
.card .meta, .pair .meta { font-size: 12px; margin-top: 4px; }
.card pre { font-size: 11px; white-space: pre-wrap; max-height: 120px; overflow: auto; background: #fee; }
.outcome-failure { color: #b22; } .outcome-error { color: #c70; } .outcome-success { color: #282; }
.tag { display: inline-block; font-size: 11px; padding: 1px 6px; border-radius: 8px; background: #eee; font-family: ui-monospace, monospace; }
.pair { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; margin: 8px 0; display: inline-block; }
.pair .sides { display: flex; gap: 12px; }
.pair .side { width: 448px; }
.pair .novideo { width: 448px; height: 272px; background: #333; color: #ddd; display: flex; align-items: center; justify-content: center; font-size: 12px; text-align: center; }
.pair .controls { display: flex; gap: 8px; align-items: center; margin-top: 6px; font-size: 12px; }
.pair .controls input { flex: 1; }
#filters { position: sticky; top: 0; background: #fafafa; padding: 6px 0; border-bottom: 1px solid #ddd; font-size: 13px; z-index: 1; }
#filters label { margin-right: 12px; white-space: nowrap; }
details { margin: 12px 0; } summary { cursor: pointer; font-weight: 600; }
img.plot { max-width: 100%; border: 1px solid #ddd; background: #fff; }
"""

# Lazy videos, the tag filter and the side-by-side control. Plain DOM, no libraries.
SCRIPT = """
(() => {
  const load = v => { if (!v.src && v.dataset.src) { v.src = v.dataset.src; v.preload = 'metadata'; } };
  const watch = 'IntersectionObserver' in window ? new IntersectionObserver(entries => entries.forEach(e => {
      if (e.isIntersecting) { load(e.target); watch.unobserve(e.target); } }), {rootMargin: '400px'}) : null;
  document.querySelectorAll('video[data-src]').forEach(v => watch ? watch.observe(v) : load(v));
  window.reviewLoad = load;

  const boxes = [...document.querySelectorAll('#filters input[data-tag]')];
  const apply = () => {
    const on = new Set(boxes.filter(b => b.checked).map(b => b.dataset.tag));
    document.querySelectorAll('[data-failure]').forEach(el => { el.hidden = !on.has(el.dataset.failure); });
  };
  boxes.forEach(b => b.addEventListener('change', apply));

  document.querySelectorAll('.pair').forEach(pair => {
    const vids = [...pair.querySelectorAll('video')];
    const button = pair.querySelector('button'), seek = pair.querySelector('input[type=range]');
    const clock = pair.querySelector('.clock');
    const length = () => Math.max(0, ...vids.map(v => v.duration || 0));
    const show = t => { clock.textContent = t.toFixed(1) + ' s'; if (length()) seek.value = Math.round(1000 * t / length()); };
    button.addEventListener('click', () => {
      vids.forEach(load);
      if (button.dataset.playing === '1') {
        vids.forEach(v => v.pause()); button.dataset.playing = '0'; button.textContent = 'play both';
      } else {
        const t = Math.max(...vids.map(v => v.currentTime));
        vids.forEach(v => { if (v.ended || (v.duration && t >= v.duration)) v.currentTime = 0; v.play().catch(() => {}); });
        button.dataset.playing = '1'; button.textContent = 'pause both';
      }
    });
    seek.addEventListener('input', () => {
      vids.forEach(load);
      const t = seek.value / 1000 * length();
      vids.forEach(v => { v.currentTime = Math.min(t, v.duration || t); });
      show(t);
    });
    vids.forEach(v => v.addEventListener('timeupdate', () => show(Math.max(...vids.map(w => w.currentTime)))));
    vids.forEach(v => v.addEventListener('ended', () => {
      if (vids.every(w => w.ended || w.paused)) { button.dataset.playing = '0'; button.textContent = 'play both'; }
    }));
  });
})();
"""


def _config_line(summary: dict[str, Any]) -> str:
    cfg = summary.get("config", {})
    keys = [("policy", policy_label(summary)), ("suite", cfg.get("suite")), ("steps", cfg.get("steps")),
            ("backend", cfg.get("backend")), ("replan", cfg.get("replan")), ("chunking", cfg.get("chunking"))]
    return "  ".join(f"{k}={v}" for k, v in keys if v is not None) + f"  [config {summary.get('config_hash', '?')}]"


def _tag(r: dict[str, Any]) -> str:
    """The episode's failure tag; results written before triage existed fall back to the outcome."""
    if r.get("failure"):
        return r["failure"]
    return "error" if r.get("error") else ("success" if r.get("success") else "untagged")


def _h(value: Any) -> str:
    """Any value read from a results file, escaped for the page (records are type-checked on reading,
    runners.rundir.check_record; this is the second line of defence)."""
    return html.escape(str(value))


def _outcome(r: dict[str, Any]) -> str:
    return "error" if r.get("error") else ("success" if r.get("success") else "failure")


def _video(eval_dir: Path, root: Path, r: dict[str, Any] | None, attrs: str = "controls") -> str | None:
    """A lazy <video> for the record's file, or None when it has none on disk."""
    video = (r or {}).get("video")
    if not video or not (eval_dir / video).is_file():
        return None
    src = html.escape(os.path.relpath(eval_dir / video, root))
    return f'<video {attrs} muted playsinline preload="none" data-src="{src}"></video>'


def _facts(trace: dict[str, Any] | None) -> str:
    f = (trace or {}).get("facts") or {}
    if not f:
        return ""
    cm = lambda x: f"{100 * x:.1f} cm" if isinstance(x, (int, float)) else "-"  # noqa: E731  (a foreign trace file)
    return (f" &middot; closest {cm(f.get('min_reach_m'))} &middot; max lift {cm(f.get('max_lift_m'))}"
            f" &middot; to goal at end {cm(f.get('final_goal_m'))}")


def _card(eval_dir: Path, root: Path, r: dict[str, Any], trace: dict[str, Any] | None) -> str:
    outcome = _outcome(r)
    card = ['<div class="card">']
    player = _video(eval_dir, root, r)
    if player:
        card.append(player)
    elif r.get("video"):
        card.append(f"<p>video missing: {html.escape(r['video'])}</p>")
    card.append(
        f'<div class="meta"><b class="outcome-{outcome}">{outcome}</b> <span class="tag">{html.escape(_tag(r))}</span>'
        f' &middot; task {_h(r["task_id"])} &middot; init state {_h(r["init_state_id"])} &middot; seed {_h(r["seed"])}'
        f' &middot; {_h(r.get("env_steps"))} env steps &middot; latency p50 {_h(num(r.get("latency_p50_ms")))} ms,'
        f' p95 {_h(num(r.get("latency_p95_ms")))} ms{_facts(trace)}</div>')
    if r.get("error"):
        card.append(f"<pre>{html.escape(str(r['error']))}</pre>")
    card.append("</div>")
    return "".join(card)


def _tag_order(tag: str) -> tuple[int, str]:
    return (TAGS.index(tag) if tag in TAGS else len(TAGS), tag)


def _failures(eval_dir: Path, root: Path, records: list[dict[str, Any]], traces: dict) -> str:
    """The failed and errored episodes, grouped by tag (then task), each group filterable."""
    failures = [r for r in records if r.get("error") or not r.get("success")]
    if not failures:
        return "<p>No failures.</p>"
    by_tag: dict[str, list] = defaultdict(list)
    for r in failures:
        by_tag[_tag(r)].append(r)
    parts = []
    for tag in sorted(by_tag, key=_tag_order):
        recs = sorted(by_tag[tag], key=lambda r: (r["suite"], r["task_id"], r["init_state_id"], r["seed"]))
        parts.append(f'<section data-failure="{html.escape(tag)}"><h3><span class="tag">{html.escape(tag)}</span>'
                     f' {len(recs)} episode{"s" if len(recs) != 1 else ""}</h3><div class="gallery">')
        parts += [_card(eval_dir, root, r, traces.get(episode_key(r))) for r in recs]
        parts.append("</div></section>")
    return "\n".join(parts)


def _tag_table(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Failure tags per task: counts of every tag present."""
    by_task: dict[tuple, Counter] = defaultdict(Counter)
    for r in records:
        by_task[(r["suite"], r["task_id"])][_tag(r)] += 1
    tags = sorted({t for c in by_task.values() for t in c}, key=_tag_order)
    if not tags or tags == ["success"]:
        return ""
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tags)
    rows = [f"<tr><td>{html.escape(s)}</td><td>{t}</td>" + "".join(f"<td>{c.get(tag, 0) or ''}</td>" for tag in tags)
            + "</tr>" for (s, t), c in sorted(by_task.items())]
    return f"<table><tr><th>suite</th><th>task</th>{head}</tr>" + "".join(rows) + "</table>"


def _successes(eval_dir: Path, root: Path, records: list[dict[str, Any]], traces: dict) -> str:
    """Successful episodes that kept a video (videos=all), folded away below the failures."""
    kept = [r for r in records if r.get("success") and not r.get("error") and r.get("video")
            and (eval_dir / r["video"]).is_file()]
    if not kept:
        return ""
    cards = "".join(_card(eval_dir, root, r, traces.get(episode_key(r))) for r in kept)
    return (f'<details><summary>Successful episodes with videos ({len(kept)})</summary>\n'
            f'<div class="gallery">{cards}</div>\n</details>')


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


def _side(root: Path, run: Path, label: str, r: dict[str, Any] | None) -> str:
    player = _video(run, root, r, attrs="")
    if r is None:
        status = "not run"
    else:
        status = f'<b class="outcome-{_outcome(r)}">{_outcome(r)}</b> <span class="tag">{html.escape(_tag(r))}</span>'
        status += f' &middot; {_h(r.get("env_steps"))} env steps'
    if player is None:
        why = "no video" if r is None or not r.get("video") else "video missing"
        if r is not None and r.get("success") and not r.get("video"):
            why = "no video: videos=failures keeps only failures (run with videos=all)"
        player = f'<div class="novideo">{html.escape(why)}</div>'
    return f'<div class="side"><div class="meta">{html.escape(label)}</div>{player}<div class="meta">{status}</div></div>'


def _pair(root: Path, c: dict[str, Any], recs: dict[str, dict], key: tuple) -> str:
    suite, task, init, seed = key
    a, b = recs["a"].get(key), recs["b"].get(key)
    task_text = html.escape((a or b or {}).get("task", ""))
    return (f'<div class="pair"><div class="meta"><b>{html.escape(suite)} task {task}</b> init state {init} seed {seed}'
            f' &middot; {task_text}</div><div class="sides">'
            + _side(root, root / c["a"], f"A: {c['setting']}={c['a_value']} ({short_name(c['a'])})", a)
            + _side(root, root / c["b"], f"B: {c['setting']}={c['b_value']} ({short_name(c['b'])})", b)
            + '</div><div class="controls"><button type="button" data-playing="0">play both</button>'
              '<input type="range" min="0" max="1000" value="0" aria-label="seek both">'
              '<span class="clock">0.0 s</span></div></div>')


def _side_by_side(root: Path, comparisons: list[dict[str, Any]]) -> str:
    """Per comparison: the discordant episodes first, both videos under one control; then, folded, the
    episodes that failed in both jobs."""
    parts = []
    for c in comparisons:
        recs = {s: read_records(root / c[s])[0] for s in ("a", "b")}
        discordant = [tuple(d[k] for k in ("suite", "task_id", "init_state_id", "seed")) for d in c["discordant"]]
        both_failed = sorted(k for k, r in recs["a"].items() if k in recs["b"] and not r.get("error")
                             and not r.get("success") and not recs["b"][k].get("error") and not recs["b"][k].get("success"))
        if not discordant and not both_failed:
            continue
        parts.append(f"<h3>{html.escape(c['setting'])}: {html.escape(str(c['a_value']))} → "
                     f"{html.escape(str(c['b_value']))} <span class=note>(A {html.escape(short_name(c['a']))}, "
                     f"B {html.escape(short_name(c['b']))})</span></h3>")
        if discordant:
            parts.append(f"<h4>Succeeded in one, failed in the other ({len(discordant)}: "
                         f"A only {c['a_only']}, B only {c['b_only']})</h4>")
            parts += [_pair(root, c, recs, k) for k in discordant]
        else:
            parts.append("<p>No discordant episodes.</p>")
        if both_failed:
            pairs = "".join(_pair(root, c, recs, k) for k in both_failed[:MAX_BOTH_FAILED])
            more = len(both_failed) - MAX_BOTH_FAILED
            more = f"<p>... and {more} more (each job's own section lists them all).</p>" if more > 0 else ""
            parts.append(f"<details><summary>Failed in both ({len(both_failed)})</summary>{pairs}{more}</details>")
    return "\n".join(parts)


def _filters(tag_counts: Counter) -> str:
    boxes = "".join(f'<label><input type="checkbox" checked data-tag="{html.escape(t)}"> {html.escape(t)} ({n})</label>'
                    for t, n in sorted(tag_counts.items(), key=lambda kv: _tag_order(kv[0])))
    return f'<div id="filters"><b>Failures shown:</b> {boxes}</div>' if boxes else ""


def write_review(root: str | os.PathLike) -> Path:
    """Write `root`/review.html and return its path."""
    root = Path(root)
    body = [_sweep_section(root)]
    runs = find_runs(root)
    if any(run != root for run in runs):
        comparisons = sweep_comparisons(root)
        if comparisons:
            body.append("<h2>Paired comparisons</h2>" + paired_table(comparisons))
            pairs = _side_by_side(root, comparisons)
            if pairs:
                body.append("<h2>Side by side</h2>" + pairs)
    tag_counts: Counter = Counter()
    for eval_dir in runs:
        records = list(read_records(eval_dir)[0].values())
        traces = read_traces(eval_dir)
        summary = read_summary(eval_dir)
        # a run still in progress has no summary yet: summarize what is there
        summary = upgrade_summary(summary) if summary is not None else summarize(records)
        title = os.path.relpath(eval_dir, root)
        tag_counts.update(_tag(r) for r in records if r.get("error") or not r.get("success"))
        body.append(f'<h2 id="{html.escape(short_name(title))}">{html.escape("evaluation" if title == "." else title)}</h2>')
        stale = not_current(eval_dir) if eval_dir != root else None
        if stale is not None:  # a sweep job left out of the tables above: say so where its old numbers show
            body.append(f'<div class="warning">Left out of the sweep\'s tables: {html.escape(stale)}. What follows is '
                        f'what its directory holds, possibly from an earlier run.</div>')
        body.append(f'<div class="config">{html.escape(_config_line(summary))}</div>')
        body.append(html_table(summary))
        body.append(_tag_table(summary, records))
        body.append(_failures(eval_dir, root, records, traces))
        body.append(_successes(eval_dir, root, records, traces))
    page = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>Review: {html.escape(root.name)}</title><style>{CSS}</style></head>\n<body>\n"
        f"<h1>Rollout review: {html.escape(root.name)}</h1>\n{_filters(tag_counts)}\n"
        + "\n".join(b for b in body if b) + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
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
