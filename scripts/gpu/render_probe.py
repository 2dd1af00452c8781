"""Renders the first observation of some LIBERO tasks and saves the camera images, so that rehearse.sh can
compare the bundle's trimmed LIBERO tree (textures restored from WebP) with the full installation,
pixel for pixel.

    python scripts/gpu/render_probe.py OUT.npz libero_spatial:4 libero_object:0
"""

from __future__ import annotations

import sys

import numpy as np

from envs.libero import LiberoEnv


def main(out: str, tasks: list[str]) -> None:
    images = {}
    for spec in tasks:
        suite, task_id = spec.split(":")
        env = LiberoEnv(suite=suite, task_id=int(task_id), camera_size=128, image_size=128, settle_steps=2)
        obs, _ = env.reset(options={"init_state_id": 0})
        images[f"{spec}/image"], images[f"{spec}/wrist_image"] = obs["image"], obs["wrist_image"]
        env.close()
    np.savez(out, **images)
    print(f"[probe] {len(images)} images -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
