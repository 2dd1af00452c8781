#!/usr/bin/env bash
# Rehearses a GPU-machine session on this CPU machine: proves the .e2e bundle is complete before any
# device time is spent. Everything happens in REHEARSE_DIR (/tmp/pi05-rehearse); nothing in / or in
# the repo changes (the debs are not unpacked here: this machine has its own EGL loader).
#
#   scripts/gpu/rehearse.sh            # both stages below
#   scripts/gpu/rehearse.sh 311        # stage 1 only;   scripts/gpu/rehearse.sh 312: stage 2 only
#
# Stage 1 (cp311, full runs): this machine has no Python 3.12 with torch (torch's CPU wheel here is
# cp311), so it builds the same bundle for cp311 (PYVER=311 build_bundle.sh; the asset parts are the
# cached ones), makes a venv standing in for the GPU image (torch + only packages the image has, see
# IMAGE below; no system site-packages), copies what a device call sends (tracked + untracked,
# not-ignored files + the bundle) and, in an emptied environment (env -i), sources setup_device.sh
# (twice: the second must find its stamp) and runs the project's commands: runners.evaluate with
# policy=zero on libero_spatial and libero_object, with Pi0.5 (tiny, random weights) on the CPU; a
# joblib sweep (vectorization=sync, see below) and a basic-launcher sweep; policy.bench --help,
# runners.bench_eval --help when it exists, pytest -m gpu --collect-only; and a render of 4 tasks' first observations compared, pixel for pixel, with the
# project's venv (the full LIBERO installation).
# Stage 2 (cp312, the real bundle): Python 3.12 (pyenv's) + the image's packages minus torch, the
# repo's own .e2e (build it first); setup_device.sh, then a LIBERO episode of each suite through
# runners.evaluate policy=zero device=cpu (envs and runners import no torch for it), and the same
# pixel comparison (both installations render with Mesa's llvmpipe here).
# REHEARSE_REPO=/path/to/checkout rehearses that checkout's code (e.g. the lead's, with work not yet
# merged) with this bundle. Each command's output goes to REHEARSE_DIR/logs/; the last lines say what
# ran and what failed; the exit status is non-zero when anything failed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
R="${REHEARSE_DIR:-/tmp/pi05-rehearse}"
STAGES="${1:-311 312}"
# The GPU image's packages that the project's import chains touch (KINDS.md "Python packages already
# there"); torch comes from the CPU wheel on this machine's disk.
IMAGE=(numpy scipy numba pillow opencv-python-headless pyyaml tqdm sentencepiece safetensors msgpack
       matplotlib joblib tensorstore ml-dtypes cloudpickle typing-extensions networkx absl-py attrs wrapt
       imageio pytest pytest-timeout psutil packaging etils)
IMAGE311=(triton==3.6.0)   # the image's triton (tests import it); 180 MB, so stage 1 only
TORCH="${REHEARSE_TORCH:-torch==2.13.0+cpu}"
PY="${PYTHON:-}"   # the project's venv (the full LIBERO installation), for the pixel comparison
if [ -z "$PY" ]; then
  for p in "$ROOT/.venv/bin/python" /work/main/.venv/bin/python; do [ -x "$p" ] && PY="$p" && break; done
fi
mkdir -p "$R/logs"
RESULTS=()
say() { echo "[rehearse] $*"; }

find_python() {  # find_python 3.11 -> a python of that version without the project's venv
  local p
  for p in /root/.pyenv/versions/$1*/bin/python$1 "/usr/bin/python$1" "$(command -v "python$1" || true)"; do
    [ -x "$p" ] && "$p" -c 'import sys; assert sys.prefix == sys.base_prefix' 2>/dev/null && { echo "$p"; return; }
  done
  return 1
}

image_venv() {  # image_venv DIR PYTHON PKG...: a venv with exactly these packages (cached by the list)
  local dir="$1" py="$2"; shift 2
  local want; want="$("$py" -V) $*"
  if [ "$(cat "$dir/.pkgs" 2>/dev/null)" != "$want" ]; then
    rm -rf "$dir"; "$py" -m venv "$dir"
    "$dir/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
    echo "$want" > "$dir/.pkgs"
  fi
}

sent_copy() {  # sent_copy DEST: what a device call sends (tracked + untracked-not-ignored files) of
  # REHEARSE_REPO (default: this checkout), with these scripts where that checkout has none
  local src="${REHEARSE_REPO:-$ROOT}"
  rm -rf "$1"; mkdir -p "$1"
  ( cd "$src" && git ls-files -co --exclude-standard -z | tar --null -T - -cf - ) | tar -xf - -C "$1"
  [ -f "$1/scripts/gpu/setup_device.sh" ] || { mkdir -p "$1/scripts/gpu"; cp -r "$HERE"/. "$1/scripts/gpu/"; }
}

# on_device VENV REPO NAME COMMAND: run COMMAND as a device call would, after sourcing the setup
on_device() {
  local venv="$1" repo="$2" name="$3" cmd="$4" t0 rc
  t0=$(date +%s)
  set +e
  env -i HOME="$R/home" PATH="$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      LANG=C.UTF-8 TERM=dumb E2E_HOME="$venv.e2e-home" E2E_GL=never OUT="$R/out" \
      bash -c "cd '$repo' && source scripts/gpu/setup_device.sh && $cmd" > "$R/logs/$name.log" 2>&1
  rc=$?
  set -e
  RESULTS+=("$(printf '%-28s rc=%d %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$(grep -h '^\[setup\] python\|^\[setup\] CHECK\|^\[setup\] no \|^\[setup\] the bundle' "$R/logs/$name.log" | tail -1 | cut -c1-150)")")
  say "$name: rc=$rc ($(( $(date +%s) - t0 )) s), log $R/logs/$name.log"
  [ $rc -eq 0 ] || tail -15 "$R/logs/$name.log" | sed 's/^/    /'
  return 0
}

# pixels_match VENV REPO TAG: render the first observation of a few tasks through the bundle (on_device)
# and through the project's venv (the full LIBERO installation), and compare the camera images
PROBE=(libero_spatial:4 libero_spatial:7 libero_object:0 libero_object:5)
pixels_match() {
  local venv="$1" repo="$2" tag="$3" rc
  on_device "$venv" "$repo" "cp${tag}_render_probe" "python scripts/gpu/render_probe.py \$OUT/probe_cp$tag.npz ${PROBE[*]}"
  if [ ! -f "$R/out/probe_source.npz" ]; then
    ( cd "$ROOT" && PYTHONPATH="$ROOT" "$PY" "$HERE/render_probe.py" "$R/out/probe_source.npz" "${PROBE[@]}" ) \
      > "$R/logs/render_probe_source.log" 2>&1 || say "render_probe_source failed: see $R/logs/render_probe_source.log"
  fi
  set +e
  "$venv/bin/python" - "$R/out/probe_cp$tag.npz" "$R/out/probe_source.npz" > "$R/logs/cp${tag}_pixels.log" 2>&1 <<'PYEOF'
import sys
import numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
assert sorted(a) == sorted(b), (sorted(a), sorted(b))
bad = [k for k in a if a[k].shape != b[k].shape or (a[k] != b[k]).any()]
print(f"{len(a) - len(bad)} of {len(a)} camera images identical to the full installation's" + (f"; differ: {bad}" if bad else ""))
sys.exit(1 if bad else 0)
PYEOF
  rc=$?; set -e
  RESULTS+=("$(printf '%-28s rc=%d        %s' "cp${tag}_pixels_match_source" "$rc" "$(tail -1 "$R/logs/cp${tag}_pixels.log")")")
  say "cp${tag}_pixels_match_source: $(tail -1 "$R/logs/cp${tag}_pixels.log")"
}

mkdir -p "$R/home" "$R/out"
rm -f "$R/out/probe_source.npz"
if [[ " $STAGES " == *" 311 "* ]]; then
  say "stage 1: cp311 bundle, image stand-in venv, full runs"
  PY311="$(find_python 3.11)" || { say "no Python 3.11 found"; exit 2; }
  image_venv "$R/venv311" "$PY311" "$TORCH" "${IMAGE[@]}" "${IMAGE311[@]}"
  sent_copy "$R/repo311"
  PYVER=311 E2E_DIR="$R/repo311/.e2e" "$HERE/build_bundle.sh" 2>&1 | grep -v WARNING | sed 's/^/    /'
  rm -rf "$R/venv311.e2e-home" "$R/out"/*
  V="$R/venv311"; P="$R/repo311"
  on_device "$V" "$P" setup_first "true"
  on_device "$V" "$P" setup_again "true"
  on_device "$V" "$P" evaluate_spatial_zero \
    "python -m runners.evaluate policy=zero suite=libero_spatial 'tasks=[0]' episodes=1 max_steps=20 num_envs=2 videos=none out=\$OUT/spatial"
  on_device "$V" "$P" evaluate_object_zero \
    "python -m runners.evaluate policy=zero suite=libero_object 'tasks=[0]' episodes=1 max_steps=20 num_envs=2 videos=none out=\$OUT/object"
  on_device "$V" "$P" evaluate_object_pi05_tiny \
    "python -m runners.evaluate policy=pi05 policy.checkpoint=random policy.config=tiny device=cpu suite=libero_object 'tasks=[1]' episodes=1 max_steps=10 num_envs=2 videos=none out=\$OUT/object_pi05"
  # joblib's loky workers cannot start the pool's spawn processes (ValueError: cannot find context for
  # 'loky', a project bug, on the project's own venv too): vectorization=sync there, as tests/test_sweep.py
  on_device "$V" "$P" sweep_joblib_sync \
    "python -m runners.sweep hydra/launcher=joblib policy=zero suite=libero_spatial 'tasks=[0]' episodes=1 max_steps=10 steps=1,3 vectorization=sync videos=none out=\$OUT/sweep"
  on_device "$V" "$P" sweep_basic_async \
    "python -m runners.sweep policy=zero suite=libero_object 'tasks=[0]' episodes=1 max_steps=10 steps=1,3 num_envs=2 videos=none out=\$OUT/sweep_basic"
  on_device "$V" "$P" policy_bench_help "python -m policy.bench --help"
  on_device "$V" "$P" bench_eval_help \
    "if [ -f runners/bench_eval.py ]; then python -m runners.bench_eval --help; else echo 'runners/bench_eval.py: not in this checkout'; fi"
  on_device "$V" "$P" pytest_gpu_collect "python -m pytest -m gpu --collect-only -q"
  # the trimmed tree renders exactly what the full installation renders (textures restored from WebP)
  pixels_match "$V" "$P" 311
  for d in spatial object object_pi05; do
    f="$R/out/$d/summary.json"
    [ -f "$f" ] && say "  $d: $(python3 -c "import json,sys; s=json.load(open('$f')); print({k: s[k] for k in list(s)[:8]})" 2>/dev/null | cut -c1-300)"
  done
  for d in sweep sweep_basic; do
    [ -d "$R/out/$d" ] && say "  $d: $(cd "$R/out/$d" && ls | tr '\n' ' ')"
  done
fi

if [[ " $STAGES " == *" 312 "* ]]; then
  say "stage 2: the repo's cp312 bundle under Python 3.12 (no torch)"
  [ -f "$ROOT/.e2e/base/site.tar.xz" ] || { say "no $ROOT/.e2e: run scripts/gpu/build_bundle.sh first"; exit 2; }
  PY312="$(find_python 3.12)" || { say "no Python 3.12 found: stage 2 skipped"; STAGES=311; }
fi
if [[ " $STAGES " == *" 312 "* ]]; then
  image_venv "$R/venv312" "$PY312" "${IMAGE[@]}"
  sent_copy "$R/repo312"
  cp -r "$ROOT/.e2e" "$R/repo312/.e2e"
  rm -rf "$R/venv312.e2e-home"
  V="$R/venv312"; P="$R/repo312"
  on_device "$V" "$P" cp312_setup "true"
  on_device "$V" "$P" cp312_evaluate_spatial_zero \
    "python -m runners.evaluate policy=zero device=cpu suite=libero_spatial 'tasks=[9]' episodes=1 max_steps=20 num_envs=2 videos=none out=\$OUT/cp312_spatial"
  on_device "$V" "$P" cp312_evaluate_object_zero \
    "python -m runners.evaluate policy=zero device=cpu suite=libero_object 'tasks=[9]' episodes=1 max_steps=20 num_envs=2 videos=none out=\$OUT/cp312_object"
  pixels_match "$V" "$P" 312
fi

echo
say "summary (logs in $R/logs):"
printf '  %s\n' "${RESULTS[@]}"
! printf '%s\n' "${RESULTS[@]}" | grep -qv ' rc=0 '
