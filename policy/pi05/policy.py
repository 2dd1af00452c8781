"""`Pi05Policy`: LIBERO observations in, LIBERO action chunks out, one batched model call.

openpi: policies/policy.py (Policy.infer), policy_config.create_trained_policy (norm stats from the
checkpoint's assets, tokenizer, transforms). Everything that can be missing (backend name,
checkpoint, tokenizer, norm stats) is checked before the weights are read.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy.backends import get_backend
from policy.base import batch_size
from policy.pi05.config import get_config
from policy.pi05.tokenizer import PaligemmaTokenizer
from policy.pi05.transforms import NormStats, find_norm_stats, to_libero_actions, to_model_images
from policy.pi05.weights import resolve_checkpoint, load_model

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pi05Policy:
    """Pi0.5 behind the two-method policy interface (`infer`, `reset`).

    checkpoint: openpi checkpoint directory (PyTorch or JAX), a model.safetensors file, "random"
                (random weights, for smoke runs), or None for openpi's cache
                ($OPENPI_DATA_HOME/openpi-assets/checkpoints/pi05_libero*).
    tokenizer:  PaliGemma SentencePiece file (default ~/.cache/openpi/big_vision/paligemma_tokenizer.model).
    norm_stats: norm_stats.json (default: found under <checkpoint>/assets/, `asset_id` to choose).
    num_steps:  denoising (Euler) steps. backend: eager | compile | fp8 | tensorrt.
    """

    needs_privileged = False

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, num_steps: int = 10,
                 device: str | None = None, dtype: str = "bfloat16", backend: str = "eager",
                 config: str = "pi05_libero", norm_stats: str | None = None, asset_id: str | None = None,
                 seed: int = 0, backend_options: dict[str, Any] | None = None):
        sampler_cls = get_backend(backend)
        cfg = get_config(config)
        random_weights = checkpoint == "random"
        ckpt = None if random_weights else resolve_checkpoint(checkpoint)
        self.tokenizer = PaligemmaTokenizer(tokenizer, max_len=cfg.max_token_len)
        if norm_stats is not None:
            self.norm_stats = NormStats.load(norm_stats)
        elif random_weights:
            log.warning("random weights and no norm stats: actions stay in the model's normalized [-1, 1] space")
            ident = {"actions": -np.ones(7, np.float32)}
            self.norm_stats = NormStats(ident, {"actions": np.ones(7, np.float32) - 1e-6}, "identity")
        else:
            ckpt_dir = ckpt if ckpt.is_dir() else ckpt.parent
            self.norm_stats = NormStats.load(find_norm_stats(ckpt_dir, asset_id))
        self.device = torch.device(device or default_device())
        self.model = load_model("random" if random_weights else ckpt, config=cfg, device=self.device, dtype=dtype)
        self.config = self.model.config
        self.chunk_size = self.config.chunk_size
        self.num_steps = int(num_steps)
        self.backend = backend
        self.sampler = sampler_cls(self.model, num_steps=self.num_steps, **(backend_options or {}))
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        # Seeded noise: the same observation gives the same chunk in every run (openpi draws fresh noise).
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def _prompts(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        states = None
        if self.config.discrete_state_input:
            states = self.norm_stats.normalize("state", np.asarray(batch["state"], dtype=np.float32))
        encoded = [self.tokenizer.encode(p, None if states is None else states[i]) for i, p in enumerate(batch["prompt"])]
        return np.stack([t for t, _ in encoded]), np.stack([m for _, m in encoded])

    @torch.no_grad()
    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        b = batch_size(batch)
        images, masks = to_model_images(batch, self.config.image_size)
        tokens, token_masks = self._prompts(batch)
        dev = self.device
        images = [torch.from_numpy(x).to(dev, non_blocking=True) for x in images]
        # masks stay on the host: samplers read the batch's shape there, so the call never waits on the GPU
        masks = [torch.from_numpy(m) for m in masks]
        tokens, token_masks = torch.from_numpy(tokens).to(dev), torch.from_numpy(token_masks)
        noise = torch.randn(b, self.chunk_size, self.config.action_dim, generator=self._generator, device=dev)
        actions = self.sampler(images, masks, tokens, token_masks, noise).float().cpu().numpy()
        return {
            "actions": to_libero_actions(actions, self.norm_stats),
            "policy_timing": {"infer_ms": 1000 * (time.perf_counter() - t0)},
        }
