"""LIBERO observations <-> Pi0.5 inputs and outputs, as openpi transforms them.

openpi: policies/libero_policy.py (LiberoInputs/LiberoOutputs), transforms.py (Normalize and
Unnormalize with quantiles, ResizeImages, PadStatesAndActions), models/model.py (uint8 -> [-1, 1]).

Inputs:  agent view -> `base_0_rgb`, wrist view -> `left_wrist_0_rgb`, `right_wrist_0_rgb` = zeros
         with mask False; images resized with pad to 224 and mapped x / 255 * 2 - 1.
Outputs: the first `len(q01)` action dims unnormalized with the quantiles
         `x = (x' + 1) / 2 * (q99 - q01 + 1e-6) + q01`, then the first 7 dims kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openpi_client.image_tools import resize_with_pad

LIBERO_ACTION_DIM = 7
LIBERO_STATE_DIM = 8  # eef position (3), axis-angle (3), gripper joints (2)


@dataclass(frozen=True)
class NormStats:
    """Quantile statistics of openpi's norm_stats.json (per key: mean, std, q01, q99)."""

    q01: dict[str, np.ndarray]
    q99: dict[str, np.ndarray]
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "NormStats":
        """Read and check openpi's norm_stats.json: every key's q01/q99 finite 1-D lists of one length with
        q01 <= q99, and 'actions' covering LIBERO's 7 action dims (fewer would leave the rest, the
        rotation and the gripper, in the model's normalized [-1, 1] space without a word)."""
        path = Path(path)
        bad = f"{path} is not a valid openpi norm_stats.json ({{'norm_stats': {{KEY: {{'q01': [...], 'q99': [...]}}}}}})"
        try:
            data = json.loads(path.read_text())["norm_stats"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{bad}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{bad}: 'norm_stats' is a {type(data).__name__}")
        q01, q99 = {}, {}
        for key, stats in data.items():
            if not isinstance(stats, dict) or stats.get("q01") is None or stats.get("q99") is None:
                raise ValueError(f"{path}: '{key}' has no q01/q99 quantiles, which Pi0.5 normalization needs")
            try:
                lo, hi = (np.asarray(stats[q], dtype=np.float32) for q in ("q01", "q99"))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: '{key}' quantiles are not lists of numbers ({exc})") from None
            if lo.ndim != 1 or lo.shape != hi.shape or not len(lo):
                raise ValueError(f"{path}: '{key}' q01 and q99 must be lists of one length, got shapes "
                                 f"{list(lo.shape)} and {list(hi.shape)}")
            if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
                raise ValueError(f"{path}: '{key}' quantiles hold NaN or infinite values")
            if (lo > hi).any():
                raise ValueError(f"{path}: '{key}' has q01 > q99 in dims {np.flatnonzero(lo > hi).tolist()}")
            q01[key], q99[key] = lo, hi
        stats = cls(q01, q99, str(path))
        stats.require("actions", LIBERO_ACTION_DIM, "LIBERO's actions are unnormalized with them")
        return stats

    def require(self, key: str, dims: int, why: str) -> None:
        """A ValueError naming the file unless `key`'s statistics cover at least `dims` dims."""
        if key not in self.q01:
            raise ValueError(f"{self.source or 'the norm stats'} has no '{key}' statistics ({why}): pass norm "
                             f"stats that have them with policy.norm_stats=PATH")
        if len(self.q01[key]) < dims:
            raise ValueError(f"{self.source or 'the norm stats'}: '{key}' statistics cover {len(self.q01[key])} dims, "
                             f"{dims} are needed ({why})")

    @classmethod
    def identity(cls, dim: int = LIBERO_ACTION_DIM) -> "NormStats":
        """Statistics that leave actions in the model's normalized [-1, 1] space (random weights)."""
        return cls({"actions": -np.ones(dim, np.float32)}, {"actions": np.ones(dim, np.float32) - 1e-6}, "identity")

    def normalize(self, key: str, x: np.ndarray) -> np.ndarray:
        lo, hi = self.q01[key][..., : x.shape[-1]], self.q99[key][..., : x.shape[-1]]
        return (x - lo) / (hi - lo + 1e-6) * 2.0 - 1.0

    def unnormalize(self, key: str, x: np.ndarray) -> np.ndarray:
        lo, hi = self.q01[key], self.q99[key]
        n = min(len(lo), x.shape[-1])
        out = np.array(x, dtype=np.float32, copy=True)
        out[..., :n] = (x[..., :n] + 1.0) / 2.0 * (hi[:n] - lo[:n] + 1e-6) + lo[:n]
        return out


def find_norm_stats(checkpoint_dir: str | Path, asset_id: str | None = None) -> Path:
    """`<checkpoint>/assets/<asset_id>/norm_stats.json`; without an asset id there must be exactly one."""
    assets = Path(checkpoint_dir) / "assets"
    if asset_id is not None:
        path = assets / asset_id / "norm_stats.json"
        if not path.is_file():
            raise FileNotFoundError(f"no norm stats at {path} (asset id {asset_id!r})")
        return path
    found = sorted(assets.rglob("norm_stats.json")) if assets.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no norm_stats.json under {assets}: openpi checkpoints keep them in assets/<asset_id>/ (for LIBERO "
            f"assets/physical-intelligence/libero/). Copy the checkpoint's assets folder there or pass norm_stats=PATH.")
    if len(found) > 1:
        ids = [str(p.parent.relative_to(assets)) for p in found]
        raise ValueError(f"several norm stats under {assets}: {', '.join(ids)}; choose one with asset_id=...")
    return found[0]


def to_model_images(batch: dict, size: int = 224) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """LIBERO batch -> the three camera slots as float32 (B, 3, size, size) in [-1, 1], and their masks."""
    slots, masks = [], []
    for key in ("image", "wrist_image"):
        imgs = np.asarray(batch[key])
        if imgs.dtype != np.uint8:
            raise ValueError(f"batch[{key!r}] must be uint8 (B, H, W, 3), got {imgs.dtype}")
        # An image without its batch axis, or channels first, would be resized into nonsense without a word.
        if imgs.ndim != 4 or imgs.shape[-1] != 3 or 0 in imgs.shape:
            raise ValueError(f"batch[{key!r}] must be RGB images (B, H, W, 3), got shape {imgs.shape}"
                             + (": add the batch axis (image[None])" if imgs.ndim == 3 else ""))
        if slots and len(imgs) != len(slots[0]):
            raise ValueError(f"batch['image'] holds {len(slots[0])} images and batch[{key!r}] {len(imgs)}: "
                             "one of each per observation")
        if imgs.shape[1:3] != (size, size):
            imgs = np.stack([resize_with_pad(im, size, size) for im in imgs])
        slots.append(imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 * 2.0 - 1.0)  # NHWC -> NCHW
        masks.append(np.ones(len(imgs), dtype=bool))
    # The right wrist slot is padding: zeros as uint8, so all -1 after the conversion, and masked.
    slots.append(np.full_like(slots[0], -1.0))
    masks.append(np.zeros(len(slots[0]), dtype=bool))
    return slots, masks


def to_libero_actions(actions: np.ndarray, stats: NormStats) -> np.ndarray:
    """Model actions (B, H, action_dim), normalized -> LIBERO actions (B, H, 7)."""
    return stats.unnormalize("actions", actions)[..., :LIBERO_ACTION_DIM]
