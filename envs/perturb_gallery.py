"""A contact sheet of what each perturbation does: one row per kind, columns severity 0 / 0.5 / 1, each
with the agent view and the wrist view the policy gets, and a caption of what was applied.

    python -m envs.perturb_gallery --out docs/perturb_gallery.png
    python -m envs.perturb_gallery --suite libero_goal --task 3 --init-state 2 --out goal.png

One LiberoEnv serves every cell: each kind wraps it in turn, at each severity the episode is reset, and
the kind is detached before the next. PIL only.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from envs.perturb import KINDS, perturbations, wrap

SEVERITIES = (0.0, 0.5, 1.0)


def collect(suite: str = "libero_spatial", task_id: int = 0, init_state_id: int = 0, kinds=tuple(KINDS),
            severities=SEVERITIES, camera_size: int = 256, image_size: int = 224, settle_steps: int = 10,
            seed: int = 7, env=None) -> dict[str, Any]:
    """{"reference": unperturbed cell, "cells": {(kind, severity): cell}}; a cell holds the two images,
    the prompt and the wrapper's `applied` record. `env`: a LiberoEnv to use (and leave open) instead of
    building one from the arguments before it (then `task_id` is the task it is on)."""
    from envs.libero import LiberoEnv

    own = env is None
    base = LiberoEnv(suite=suite, task_id=task_id, camera_size=camera_size, image_size=image_size,
                     settle_steps=settle_steps, seed=seed) if own else env
    try:
        obs, info = base.reset(seed=seed, options={"init_state_id": init_state_id})
        out = {"reference": _cell(obs, info, {}), "cells": {}, "suite": base.suite, "task_id": base.task_id,
               "init_state_id": init_state_id}
        for kind in kinds:
            env = wrap(base, [{"name": kind, "severity": 0.0}])
            wrapper = perturbations(env)[0]
            for s in severities:
                wrapper.set_severity(s)
                obs, info = env.reset(seed=seed, options={"init_state_id": init_state_id})
                out["cells"][(kind, float(s))] = _cell(obs, info, wrapper.applied)
            if hasattr(wrapper, "detach"):
                wrapper.detach()
        return out
    finally:
        if own:
            base.close()


def _cell(obs, info, applied) -> dict[str, Any]:
    return {"image": obs["image"].copy(), "wrist_image": obs["wrist_image"].copy(), "task": info["task"],
            "applied": dict(applied)}


def caption(kind: str, cell: dict[str, Any]) -> str:
    a = cell["applied"]
    if not a:
        return "unperturbed"
    if kind == "camera":
        return f"moved {a['shift_m'] * 100:.1f} cm, turned {a['rotation_deg']:.1f} deg"
    if kind == "lighting":
        return f"intensity x{a['intensity_factor']:.2f}, tilted {a['tilt_deg']:.0f} deg"
    if kind == "image":
        return "blur + noise + jpeg" if len(a["kinds"]) == 3 else " + ".join(a["kinds"])
    if kind == "robot_init":
        return f"joints moved up to {np.abs(a['joint_offset_rad']).max():.3f} rad"
    if kind == "object_init":
        moved = [np.linalg.norm(d) for d in a["offsets"].values()]
        return f"objects moved up to {max(moved, default=0) * 100:.1f} cm"
    if kind == "language":
        return cell["task"]
    return ""


def contact_sheet(data: dict[str, Any], thumb: int = 160) -> Image.Image:
    cells = data["cells"]
    kinds = list(dict.fromkeys(k for k, _ in cells))
    severities = sorted({s for _, s in cells})
    font = ImageFont.load_default(size=max(9, thumb // 14))
    label_w, head_h, cap_h, pad = thumb, 28, max(30, thumb // 3), 6
    width = label_w + len(severities) * (2 * thumb + pad)
    row_h = thumb + cap_h
    sheet = Image.new("RGB", (width, head_h + len(kinds) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(10, int(2 * thumb / (font.size * 0.55)))
    for j, s in enumerate(severities):
        x = label_w + j * (2 * thumb + pad)
        draw.text((x + 4, 6), f"severity {s:g}: agent view | wrist view", fill="black", font=font)
    for i, kind in enumerate(kinds):
        y = head_h + i * row_h
        draw.text((6, y + thumb // 2 - 8), kind, fill="black", font=font)
        for j, s in enumerate(severities):
            cell = cells[(kind, s)]
            x = label_w + j * (2 * thumb + pad)
            for v, view in enumerate(("image", "wrist_image")):
                im = Image.fromarray(cell[view]).resize((thumb, thumb), Image.BILINEAR)
                sheet.paste(im, (x + v * thumb, y))
            lines = textwrap.wrap(caption(kind, cell), chars)[:3]
            draw.multiline_text((x + 2, y + thumb + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    return sheet


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--init-state", type=int, default=0)
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--thumb", type=int, default=160, help="cell size in pixels")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    data = collect(args.suite, args.task, args.init_state, kinds=args.kinds, seed=args.seed)
    sheet = contact_sheet(data, args.thumb)
    # A 256-colour palette keeps the PNG small (the brief: < 1 MB in the repository); rendered scenes
    # lose little at thumbnail size.
    sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
