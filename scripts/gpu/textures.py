"""Lossless WebP stand-ins for LIBERO's PNG textures, so that the GPU bundle fits the device's 64 MiB.

LIBERO's textures are large PNGs (up to 4096x4096) that xz cannot shrink; WebP's lossless mode stores
the same pixels in about half the bytes. build_bundle.sh packs `X.png` as `X.png.webp` (`pack`), after
checking that the PNG which `unpack` will write back decodes, in MuJoCo itself, to exactly the texels
of the original (`check`); a texture that fails the check travels as its PNG. setup_device.sh runs
`unpack` on the device, which writes each `X.png` (same pixels, same PIL mode; the bytes differ, as
the PNG is re-deflated) and deletes the WebP file.

    python scripts/gpu/textures.py pack DIR CACHE_DIR      # build side: every DIR/**/X.png -> X.png.webp
    python scripts/gpu/textures.py unpack DIR [DIR ...]    # device side; idempotent

Only Pillow (with WebP, as Pillow's PyPI wheels have it) is needed on the device; `pack` also needs
MuJoCo (the project's venv).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, features

SUFFIX = ".webp"
# The PIL mode the PNG had (WebP keeps only RGB/RGBA; an all-opaque RGBA image comes back as RGB).
MODE_KEY = "pi05_png_mode"


def _encode(src: Path) -> bytes:
    import io

    im = Image.open(src)
    im.load()
    if im.mode not in ("RGB", "RGBA", "L", "LA"):
        raise ValueError(f"{src}: PIL mode {im.mode} is not packed (kept as PNG)")
    buf = io.BytesIO()
    rgb = im.convert("RGBA" if "A" in im.mode else "RGB")
    # The original mode rides in the WebP's XMP field; `exact` keeps RGB under fully transparent pixels.
    rgb.save(buf, "WEBP", lossless=True, quality=100, method=6, exact=True,
             xmp=f"{MODE_KEY}={im.mode}".encode())
    return buf.getvalue()


def _decode_to_png(webp: Path, png: Path) -> None:
    im = Image.open(webp)
    im.load()
    xmp = im.info.get("xmp", b"")
    xmp = xmp.decode() if isinstance(xmp, bytes) else str(xmp)
    mode = xmp.split(f"{MODE_KEY}=", 1)[1].strip() if MODE_KEY in xmp else im.mode
    tmp = png.with_name(png.name + ".part")
    im.convert(mode).save(tmp, "PNG", compress_level=1)
    os.replace(tmp, png)


def _mujoco_texels(png: Path):
    import mujoco

    xml = f'<mujoco><asset><texture name="t" type="2d" file="{png}"/></asset></mujoco>'
    m = mujoco.MjModel.from_xml_string(xml)
    return m.tex_data.copy(), (int(m.tex_width[0]), int(m.tex_height[0]), int(m.tex_nchannel[0]))


def check(src: Path, webp: bytes) -> bool:
    """Whether the PNG that `unpack` makes of `webp` gives MuJoCo the same texels as `src`."""
    with tempfile.TemporaryDirectory() as d:
        w = Path(d) / "t.png.webp"
        w.write_bytes(webp)
        out = Path(d) / "t.png"
        _decode_to_png(w, out)
        a, sa = _mujoco_texels(src)
        b, sb = _mujoco_texels(out)
        with Image.open(src) as i0, Image.open(out) as i1:
            same_pil = i0.mode == i1.mode and i0.size == i1.size and i0.tobytes() == i1.tobytes()
    return sa == sb and a.shape == b.shape and bool((a == b).all()) and same_pil


def _pack_one(src: Path, cache: Path) -> bool:
    """Replace src (PNG) by src.webp and return True, or leave it and return False. Encodings are
    cached by the PNG's content hash (a 4096x4096 texture takes seconds)."""
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    hit, miss = cache / f"{digest}.webp", cache / f"{digest}.keep-png"
    if miss.exists():
        return False
    if not hit.exists():
        try:
            data = _encode(src)
            ok = len(data) < src.stat().st_size and check(src, data)
        except (ValueError, OSError) as e:
            print(f"[textures] {src.name}: {e}", file=sys.stderr)
            ok = False
        if not ok:
            miss.touch()
            return False
        tmp = hit.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, hit)
    shutil.copyfile(hit, src.with_name(src.name + SUFFIX))
    src.unlink()
    return True


def pack(root: str, cache: str) -> int:
    pngs = sorted(Path(root).rglob("*.png"))
    Path(cache).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(len(pngs), os.cpu_count() or 1) or 1) as pool:
        done = list(pool.map(_pack_one, pngs, [Path(cache)] * len(pngs)))
    kept = [str(p.relative_to(root)) for p, d in zip(pngs, done) if not d]
    print(f"[textures] {sum(done)} of {len(pngs)} PNG textures packed as lossless WebP"
          + (f"; kept as PNG: {', '.join(kept)}" if kept else ""))
    return 0


def _unpack_one(webp: str) -> None:
    _decode_to_png(Path(webp), Path(webp[: -len(SUFFIX)]))
    os.remove(webp)


def unpack(dirs: list[str]) -> int:
    if not features.check("webp"):
        print("[textures] this Pillow has no WebP support: rebuild the bundle with E2E_WEBP=0", file=sys.stderr)
        return 2
    todo = [str(p) for d in dirs for p in Path(d).rglob(f"*.png{SUFFIX}")]
    if todo:
        with ProcessPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1, 16)) as pool:
            list(pool.map(_unpack_one, todo))
    return 0


if __name__ == "__main__":
    cmd, *args = sys.argv[1:] or ["help"]
    if cmd == "pack" and len(args) == 2:
        sys.exit(pack(*args))
    if cmd == "unpack" and args:
        sys.exit(unpack(args))
    sys.exit(__doc__)
