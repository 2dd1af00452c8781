"""Image corruption of the policy-facing frames: blur, then sensor noise, then JPEG compression.

Severity s maps to (each kind can be left out with `kinds`):

    blur   Gaussian blur with standard deviation s * max_blur_px pixels (default 2.0 px at 224x224)
    noise  additive Gaussian noise, standard deviation s * max_noise_std * 255 grey levels per channel
           (default 0.10: 25.5 levels at s = 1), rounded and clipped to 0..255
    jpeg   JPEG encode/decode at quality round(100 - s * (100 - min_jpeg_quality)) (default 10 at s = 1,
           55 at s = 0.5)

Applied to `obs["image"]` and `obs["wrist_image"]` (the `views`) after the environment has made them;
the state, the physics and `render()` are unchanged (the runner's videos, made from the observations,
show the corrupted frames: what the policy saw). Noise
is drawn from a generator seeded per episode and advanced once per frame, so an episode's noise depends
only on (seed, task, init state) and the step number. NumPy and PIL only.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from envs.perturb.base import Perturbation, episode_rng

KINDS = ("blur", "noise", "jpeg")


def corrupt(image: np.ndarray, severity: float, rng: np.random.Generator, kinds=KINDS, max_blur_px: float = 2.0,
            max_noise_std: float = 0.10, min_jpeg_quality: int = 10) -> np.ndarray:
    """One (H, W, 3) uint8 frame, corrupted. Draws the same normals from `rng` whatever the severity."""
    out = image
    if "blur" in kinds and severity > 0 and max_blur_px > 0:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=severity * max_blur_px)))
    if "noise" in kinds:
        normals = rng.standard_normal(out.shape)
        if severity > 0 and max_noise_std > 0:
            noisy = out.astype(np.float64) + normals * (severity * max_noise_std * 255.0)
            out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if "jpeg" in kinds and severity > 0:
        quality = int(round(100 - severity * (100 - min_jpeg_quality)))
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=quality)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


class ImageCorruption(Perturbation):
    name = "image"

    def __init__(self, env, severity: float = 0.0, kinds=KINDS, views=("image", "wrist_image"),
                 max_blur_px: float = 2.0, max_noise_std: float = 0.10, min_jpeg_quality: int = 10):
        self.kinds = tuple(kinds)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"image: kinds must be a non-empty subset of {list(KINDS)}, got {list(kinds)}")
        self.views = tuple(views)
        if max_blur_px < 0 or max_noise_std < 0 or not 1 <= int(min_jpeg_quality) <= 100:
            raise ValueError("image: max_blur_px and max_noise_std must be >= 0 and min_jpeg_quality in 1..100, got "
                             f"{max_blur_px}, {max_noise_std}, {min_jpeg_quality}")
        self.options = dict(max_blur_px=float(max_blur_px), max_noise_std=float(max_noise_std),
                            min_jpeg_quality=int(min_jpeg_quality))
        super().__init__(env, severity)
        unknown = [v for v in self.views if v not in self.observation_space.spaces]
        if unknown:
            raise ValueError(f"image: views {unknown} are not observation keys; keys: {list(self.observation_space.spaces)}")
        self._rng: np.random.Generator | None = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._rng = episode_rng(self.libero, self.name)
        self.applied = {"kinds": self.kinds, "views": self.views, **self.options} if self.severity > 0 else {}
        return self._corrupt(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._corrupt(obs), reward, terminated, truncated, info

    def _corrupt(self, obs):
        if self.severity == 0:
            return obs
        obs = dict(obs)
        for view in self.views:
            obs[view] = corrupt(obs[view], self.severity, self._rng, self.kinds, **self.options)
        return obs
