"""`Pi05Policy`: LIBERO observations in, LIBERO action chunks out, one batched model call.

openpi: policies/policy.py (Policy.infer), policy_config.create_trained_policy (norm stats from the
checkpoint's assets, tokenizer, transforms). Everything that can be missing (backend name,
checkpoint, tokenizer, norm stats, steps, dtype, the backend's options) is checked before the weights are read.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy.backends import check_options, get_backend
from policy.backends.rtc import Guide, prefix_weights
from policy.base import batch_size
from policy.pi05.checkpoints import checkpoint_identity, is_lerobot_checkpoint, load_model, resolve_checkpoint
from policy.pi05.config import get_config
from policy.pi05.tokenizer import TOKENIZER_HELP, PaligemmaTokenizer, default_tokenizer_path
from policy.pi05.transforms import LIBERO_ACTION_DIM, LIBERO_STATE_DIM, NormStats, find_norm_stats, to_libero_actions, to_model_images

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
IMAGE_ORIENTATIONS = ("upright", "raw")
DTYPES = ("bfloat16", "float32", "float16")
PREPARE_PROMPT = "pick up the black bowl between the plate and the ramekin and place it on the plate"
LEROBOT_HELP = (
    "{path} is a lerobot conversion (model.-prefixed keys or lerobot processor files). Its weights load, but the "
    "normalization statistics it was trained with live in lerobot's processor files "
    "(policy_preprocessor*/policy_postprocessor*), which this harness does not read, so its actions cannot be "
    "unnormalized correctly. Write them as openpi's norm_stats.json ({{\"norm_stats\": {{\"actions\": {{\"q01\": [...], "
    "\"q99\": [...]}}, ...}}}}) and pass policy.norm_stats=PATH. Check its image orientation too: checkpoints "
    "trained on LIBERO's raw MuJoCo frames (not rotated 180 degrees as openpi's data) need policy.images=raw."
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pi05Policy:
    """Pi0.5 behind the two-method policy interface (`infer`, `reset`).

    checkpoint: openpi checkpoint directory (PyTorch or JAX), a model.safetensors file, "random"
                (random weights, for speed tests), or None for openpi's cache
                ($OPENPI_DATA_HOME/openpi-assets/checkpoints/pi05_libero*).
    tokenizer:  PaliGemma SentencePiece file (default ~/.cache/openpi/big_vision/paligemma_tokenizer.model;
                with random weights and no file, a generated stand-in, with a warning).
    norm_stats: norm_stats.json (default: found under <checkpoint>/assets/, `asset_id` to choose).
    num_steps:  denoising (Euler) steps (the `steps` setting). backend: eager | compile | fp8 | tensorrt.
    images:     `upright` (LiberoEnv's frames, rotated 180 degrees from MuJoCo's as openpi trained) or
                `raw` (rotated back, for checkpoints trained on MuJoCo's raw frames).
    rtc_beta:   real-time chunking's guidance weight clip (execution=rtc; the paper's beta).
    max_batch:  the largest batch `prepare` readies; backends with static shapes pad every call to the
                next of BATCH_BUCKETS, so a batch size never seen before compiles nothing.
    """

    needs_privileged = False

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, num_steps: int = 10,
                 device: str | None = None, dtype: str = "bfloat16", backend: str = "eager",
                 config: str = "pi05_libero", norm_stats: str | None = None, asset_id: str | None = None,
                 seed: int = 0, images: str = "upright", rtc_beta: float = 5.0,
                 backend_options: dict[str, Any] | None = None):
        sampler_cls = get_backend(backend)
        backend_options = check_options(backend, backend_options)
        cfg = get_config(config)
        if images not in IMAGE_ORIENTATIONS:
            raise ValueError(f"images must be one of {', '.join(IMAGE_ORIENTATIONS)}, got {images!r}")
        if str(dtype).removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ValueError(f"num_steps (steps=) must be a whole number of denoising steps >= 1, got {num_steps!r}")
        random_weights = checkpoint == "random"
        ckpt = None if random_weights else resolve_checkpoint(checkpoint)
        if ckpt is not None and norm_stats is None and is_lerobot_checkpoint(ckpt):
            raise ValueError(LEROBOT_HELP.format(path=ckpt))
        if tokenizer is None and random_weights and not default_tokenizer_path().is_file():
            self.tokenizer = PaligemmaTokenizer.stand_in(max_len=cfg.max_token_len)
        else:
            self.tokenizer = PaligemmaTokenizer(tokenizer, max_len=cfg.max_token_len)
        if self.tokenizer.vocab_size > cfg.vocab_size:  # its ids would index past the embedding table
            raise ValueError(f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} pieces, more than the "
                             f"model's {cfg.vocab_size} token embeddings: it is not PaliGemma's tokenizer. {TOKENIZER_HELP}")
        if norm_stats is not None:
            self.norm_stats = NormStats.load(norm_stats)
        elif random_weights:
            log.warning("random weights and no norm stats: actions stay in the model's normalized [-1, 1] space")
            self.norm_stats = NormStats.identity()
        else:
            ckpt_dir = ckpt if ckpt.is_dir() else ckpt.parent
            self.norm_stats = NormStats.load(find_norm_stats(ckpt_dir, asset_id))
        if cfg.discrete_state_input:  # the state goes into the prompt, normalized: its statistics must be there
            named = f"config {config!r}" if isinstance(config, str) else "this config (discrete_state_input)"
            self.norm_stats.require("state", LIBERO_STATE_DIM, f"{named} puts the robot state in the prompt")
        weights = checkpoint_identity(ckpt) if ckpt is not None else None
        # What decides this policy's actions, for a remote client's config hash (runners/serve.py sends it):
        # the weights' content (not their path), sampling and preprocessing settings, the noise seed.
        self.identity = {"checkpoint_sha256": weights["sha256"] if weights else "random",
                         "config": config if isinstance(config, str) else "custom", "num_steps": int(num_steps),
                         "backend": backend, "dtype": str(dtype), "images": images, "seed": int(seed)}
        self.device = torch.device(device or default_device())
        self.model = load_model("random" if random_weights else ckpt, config=cfg, device=self.device, dtype=dtype)
        self.config = self.model.config
        self.chunk_size = self.config.chunk_size
        self.num_steps = int(num_steps)
        self.backend = backend
        self.images = images
        self.sampler = sampler_cls(self.model, num_steps=self.num_steps, **(backend_options or {}))
        # Static-shape backends compile and capture per batch size: pad to a few sizes instead.
        self.static_shapes = backend != "eager"
        # Real-time chunking (policy/backends/rtc.py) where the backend implements it.
        self.supports_rtc = bool(getattr(self.sampler, "supports_rtc", False))
        self.rtc_beta = float(rtc_beta)
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        # Seeded noise (openpi draws fresh noise): batches without episode ids draw from this generator.
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def _noise(self, batch: dict[str, Any], b: int) -> torch.Tensor:
        """(b, chunk, action_dim) initial noise. When the runner names each row's episode and step, a
        row's noise depends on (seed, episode, step) alone, not on which other rows share its batch or
        in what order, so an episode is reproducible however the pool's timing groups the calls, and
        every configuration of a sweep starts each episode's flow from the same noise."""
        shape = (self.chunk_size, self.config.action_dim)
        episodes, steps = batch.get("episode"), batch.get("step")
        if episodes is None or steps is None:
            return torch.randn(b, *shape, generator=self._generator, device=self.device)
        rows = []
        for episode, step in zip(episodes, steps):
            if episode is None:  # a row without an id (a mixed server batch): the shared generator's
                rows.append(torch.randn(shape, generator=self._generator, device=self.device).cpu())
                continue
            key = hashlib.sha256(repr((self.seed, tuple(episode), int(step))).encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
            rows.append(torch.randn(shape, generator=g))
        return torch.stack(rows).to(self.device)

    def padded_size(self, b: int) -> int:
        """The batch size a call of `b` rows runs at (the next bucket for static-shape backends)."""
        if not self.static_shapes:
            return b
        return next((k for k in BATCH_BUCKETS if k >= b), -(-b // BATCH_BUCKETS[-1]) * BATCH_BUCKETS[-1])

    def prepare(self, max_batch: int) -> dict[int, float]:
        """Compile and capture every batch bucket up to `max_batch` now (seconds per bucket), so no call
        of an evaluation pays for it; a no-op for eager. Uses a black frame pair and a LIBERO prompt."""
        timings = {}
        if not self.static_shapes:
            return timings
        sizes = sorted({self.padded_size(b) for b in range(1, max(1, int(max_batch)) + 1)})
        size = self.config.image_size
        state = self._generator.get_state()
        for b in sizes:
            t0 = time.perf_counter()
            self.infer({"image": np.zeros((b, size, size, 3), np.uint8), "wrist_image": np.zeros((b, size, size, 3), np.uint8),
                        "state": np.zeros((b, LIBERO_STATE_DIM), np.float32), "prompt": [PREPARE_PROMPT] * b})
            timings[b] = time.perf_counter() - t0
        self._generator.set_state(state)  # warm-up draws no noise the evaluation would see
        return timings

    def _guide(self, batch: dict[str, Any], rows: int) -> Guide:
        """Real-time chunking's target and weights from the runner's previous chunks (policy/base.py):
        the previous actions normalized into the model's space, guided on LIBERO's 7 dimensions only."""
        if not self.supports_rtc:
            raise ValueError(f"backend {self.backend!r} does not implement real-time chunking; use eager or compile")
        h, dim = self.chunk_size, self.config.action_dim
        prev = np.asarray(batch["prev_actions"], dtype=np.float32)[:, :h]
        target = np.zeros((len(prev), h, dim), np.float32)
        target[:, : prev.shape[1], :LIBERO_ACTION_DIM] = self.norm_stats.normalize("actions", prev[..., :LIBERO_ACTION_DIM])
        frozen = torch.as_tensor(np.asarray(batch["prev_frozen"]), dtype=torch.long)
        overlap = torch.as_tensor(np.minimum(np.asarray(batch["prev_overlap"]), prev.shape[1]), dtype=torch.long)
        weights = prefix_weights(frozen, overlap, h)[:, :, None].numpy() * (np.arange(dim) < LIBERO_ACTION_DIM)
        target, weights = _guide_rows(target, rows), _guide_rows(weights.astype(np.float32), rows)
        return Guide(torch.from_numpy(target).to(self.device), torch.from_numpy(weights).to(self.device), self.rtc_beta)

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
        if self.images == "raw":
            batch = {**batch, **{k: np.asarray(batch[k])[:, ::-1, ::-1] for k in ("image", "wrist_image")}}
        images, masks = to_model_images(batch, self.config.image_size)
        tokens, token_masks = self._prompts(batch)
        # Noise for the real rows only, drawn exactly as an unpadded call would (padding rows get zeros).
        noise = self._noise(batch, b)
        padded = self.padded_size(b)
        if padded > b:
            images, masks, tokens, token_masks = (_pad_rows(x, padded) for x in (images, masks, tokens, token_masks))
            noise = torch.cat([noise, noise.new_zeros(padded - b, *noise.shape[1:])])
        dev = self.device
        images = [torch.from_numpy(x).to(dev, non_blocking=True) for x in images]
        # masks stay on the host: samplers read the batch's shape there, so the call never waits on the GPU
        masks = [torch.from_numpy(m) for m in masks]
        tokens, token_masks = torch.from_numpy(tokens).to(dev), torch.from_numpy(token_masks)
        guide = self._guide(batch, padded) if "prev_actions" in batch else None
        extra = {"guide": guide} if guide is not None else {}
        actions = self.sampler(images, masks, tokens, token_masks, noise, **extra)[:b].float().cpu().numpy()
        return {
            "actions": to_libero_actions(actions, self.norm_stats),
            "policy_timing": {"infer_ms": 1000 * (time.perf_counter() - t0), "batch": b, "padded_batch": padded},
        }


def _guide_rows(x: np.ndarray, n: int) -> np.ndarray:
    """Pad rows of an RTC input with zeros (padding rows are not guided)."""
    return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)]) if n > len(x) else x


def _pad_rows(x, n: int):
    """Repeat the last row (a list of arrays: each) up to `n` rows; padding rows are sliced off after."""
    if isinstance(x, list):
        return [_pad_rows(a, n) for a in x]
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])
