"""Pi0.5: SigLIP + Gemma 2B over the prefix, Gemma 300M action expert, flow matching.

openpi: src/openpi/models/pi0.py (JAX) and models_pytorch/pi0_pytorch.py (embed_prefix,
sample_actions, denoise_step). Inference:

  prefix  = [SigLIP tokens of each camera slot | prompt embeddings * sqrt(width)]   (bidirectional)
  cache   = post-RoPE K/V of every Gemma 2B layer over the prefix                    (once per observation)
  x_1     = noise ~ N(0, I), shape (B, chunk, 32)
  for t = 1, 1 - 1/N, ... (N Euler steps, dt = -1/N):   x <- x + dt * v(x, t)
  v(x, t) = action_out_proj(expert(action_in_proj(x), cond = time_mlp(sincos(t)), attending [cache ; itself]))

The action tokens attend bidirectionally to each other and to every valid prefix token; the prefix
never sees them, so the prefix is computed once. Masked camera slots and padded prompt tokens are
dropped before any compute ("compact" prefix); positions are computed as openpi does (valid tokens
count 0, 1, 2, ...), so results equal the masked computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policy.pi05.config import CAMERA_SLOTS, Pi05Config
from policy.pi05.gemma import AdaRMSNorm, GemmaExpert, GemmaLM, rope_cos_sin
from policy.pi05.siglip import Projector, SiglipVision


@dataclass
class Prefix:
    embs: torch.Tensor  # (B, L, width)
    valid: torch.Tensor  # (B, L) bool
    positions: torch.Tensor  # (B, L) int64


@dataclass
class PrefixCache:
    k: list[torch.Tensor]  # per layer (B, 1, L, head_dim), after RoPE
    v: list[torch.Tensor]  # per layer (B, 1, L, head_dim)
    valid: torch.Tensor  # (B, L) bool
    n_valid: torch.Tensor  # (B,) int64: the suffix's first position
    # (B, L + chunk) bool: which keys the action tokens attend to ([prefix ; themselves]), or None when
    # every key is valid. Decided once per prefix so the denoise loop never reads a tensor on the host.
    suffix_key_valid: torch.Tensor | None


def euler_times(num_steps: int) -> tuple[list[float], float]:
    """openpi's schedule: t from 1 down by dt = float32(-1/N), accumulated in float32 (exactly the
    t values openpi's `while t >= -dt / 2` loop visits, without a tensor comparison per step)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = np.float32(-1.0 / num_steps)
    t, times = np.float32(1.0), []
    for _ in range(num_steps):
        times.append(float(t))
        t = np.float32(t + dt)
    return times, float(dt)


def as_slots(items: Sequence | Mapping, what: str) -> list:
    """Camera slots as a list in openpi's order, from a sequence of 3 or a dict keyed by slot name."""
    if isinstance(items, Mapping):
        missing = [s for s in CAMERA_SLOTS if s not in items]
        if missing:
            raise ValueError(f"{what} is missing camera slots {missing}; expected {list(CAMERA_SLOTS)}")
        return [items[s] for s in CAMERA_SLOTS]
    items = list(items)
    if len(items) != len(CAMERA_SLOTS):
        raise ValueError(f"{what} must hold {len(CAMERA_SLOTS)} camera slots {list(CAMERA_SLOTS)}, got {len(items)}")
    return items


class Pi05Model(nn.Module):
    """Pi0.5 as plain torch modules. Parameter names map one-to-one onto openpi's checkpoint keys
    (policy/pi05/weights.py)."""

    def __init__(self, config: Pi05Config):
        super().__init__()
        if config.num_kv_heads != 1:
            raise ValueError("Pi0.5's Gemma experts use multi-query attention (num_kv_heads=1)")
        self.config = config
        self.vision = SiglipVision(config)
        self.projector = Projector(config)
        self.llm = GemmaLM(config)
        self.expert = GemmaExpert(config)
        w = config.expert_width
        self.action_in_proj = nn.Linear(config.action_dim, w)
        self.action_out_proj = nn.Linear(w, config.action_dim)
        self.time_mlp_in = nn.Linear(w, w)
        self.time_mlp_out = nn.Linear(w, w)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the transformers (bf16 as openpi serves, or fp32)."""
        return self.llm.embed_tokens.weight.dtype

    # ----- prefix -----------------------------------------------------------------------------------
    def embed_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """SigLIP + projector for several slots in one batched pass: each (B, 256, width)."""
        b = images[0].shape[0]
        tokens = self.projector(self.vision(torch.cat(images, dim=0)))
        return list(tokens.split(b, dim=0))

    def embed_prefix(self, images, image_masks, tokens, token_masks, compact: bool = True) -> Prefix:
        """The prefix embeddings, validity and positions. `compact=False` keeps openpi's full
        layout (3 x 256 image tokens + max_token_len) with masks; `compact=True` drops every invalid
        token (a camera slot masked for the whole batch is not even encoded)."""
        images, image_masks = as_slots(images, "images"), as_slots(image_masks, "image_masks")
        b = tokens.shape[0]
        n = self.config.num_patches
        keep = [i for i, m in enumerate(image_masks) if not compact or bool(m.any())]
        embs, valid = [], []
        if keep:
            for i, e in zip(keep, self.embed_images([images[i] for i in keep])):
                embs.append(e)
                valid.append(image_masks[i].to(torch.bool)[:, None].expand(b, n))
        embs.append(self.llm.embed(tokens).to(self.dtype))
        valid.append(token_masks.to(torch.bool))
        embs, valid = torch.cat(embs, dim=1), torch.cat(valid, dim=1)
        if not compact:
            return Prefix(embs, valid, torch.cumsum(valid, dim=1) - 1)
        counts = valid.sum(dim=1)
        length = int(counts.max())
        # Stable sort puts each row's valid tokens first, in order: their index is then their position.
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :length]
        embs = torch.gather(embs, 1, order[..., None].expand(b, length, embs.shape[-1]))
        positions = torch.arange(length, device=embs.device).expand(b, length)
        return Prefix(embs, positions < counts[:, None], positions)

    def prefill(self, prefix: Prefix) -> PrefixCache:
        """Run Gemma 2B over the prefix; keep every layer's post-RoPE K and V."""
        cfg = self.config
        cos, sin = rope_cos_sin(prefix.positions, cfg.head_dim, cfg.rope_theta, self.dtype)
        key_valid = None if bool(prefix.valid.all()) else prefix.valid
        x, ks, vs = prefix.embs, [], []
        last = len(self.llm.layers) - 1
        for i, layer in enumerate(self.llm.layers):
            x, k, v = layer(x, cos, sin, key_valid, need_output=i < last)
            ks.append(k)
            vs.append(v)
        n_valid = prefix.valid.sum(dim=1)
        suffix_key_valid = None
        if key_valid is not None:
            b = prefix.valid.shape[0]
            suffix_key_valid = torch.cat([prefix.valid, prefix.valid.new_ones(b, cfg.chunk_size)], dim=1)
        return PrefixCache(ks, vs, prefix.valid, n_valid, suffix_key_valid)

    # ----- suffix -----------------------------------------------------------------------------------
    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding of t (B,) -> (B, expert_width) fp32: sin half first, periods from
        min_period to max_period, computed in float64 as openpi's PyTorch model does."""
        cfg = self.config
        frac = torch.linspace(0.0, 1.0, cfg.expert_width // 2, dtype=torch.float64, device=t.device)
        period = cfg.min_period * (cfg.max_period / cfg.min_period) ** frac
        scaling = 1.0 / period * 2 * math.pi
        angle = scaling[None, :] * t.to(torch.float64)[:, None]
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).to(torch.float32)

    def time_conditioning(self, t: torch.Tensor) -> torch.Tensor:
        """adaRMS conditioning: swish(W_out swish(W_in sincos(t))), both swishes included. (B, w) fp32."""
        emb = self.time_embedding(t).to(self.time_mlp_in.weight.dtype)
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))

    def denoise_step(self, cache: PrefixCache, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity v(x_t, t): x_t (B, chunk, action_dim) fp32, t (B,) fp32 -> (B, chunk, action_dim) fp32."""
        cfg = self.config
        b, h, _ = x_t.shape
        x = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype)).to(self.dtype)
        cond = self.time_conditioning(t)
        positions = cache.n_valid[:, None] + torch.arange(h, device=x.device)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype)
        key_valid = cache.suffix_key_valid
        if key_valid is not None and key_valid.shape[1] != cache.valid.shape[1] + h:
            raise ValueError(f"x_t has {h} action tokens; the cache was made for {key_valid.shape[1] - cache.valid.shape[1]}")
        for layer, pk, pv in zip(self.expert.layers, cache.k, cache.v):
            x = layer(x, cond, cos, sin, pk, pv, key_valid)
        scale, shift, _ = self.expert.norm.modulation(cond)
        x = AdaRMSNorm.modulate(x, scale, shift, cfg.norm_eps)
        return self.action_out_proj(x.to(self.action_out_proj.weight.dtype)).float()

    @torch.no_grad()
    def sample_actions(self, images, image_masks, tokens, token_masks, noise=None, num_steps: int = 10,
                       compact: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalized actions (B, chunk_size, action_dim) by `num_steps` Euler steps of the flow.

        images: the 3 camera slots in openpi's order (base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb)
        as float (B, 3, 224, 224) in [-1, 1] (a sequence, or a dict by slot name); image_masks: bool
        (B,) per slot; tokens: int64 (B, L) with token_masks bool (B, L); noise: (B, chunk, action_dim).
        """
        cfg = self.config
        b = tokens.shape[0]
        if noise is None:
            noise = torch.randn(b, cfg.chunk_size, cfg.action_dim, generator=generator, device=tokens.device)
        cache = self.prefill(self.embed_prefix(images, image_masks, tokens, token_masks, compact=compact))
        return self.denoise(cache, noise, num_steps)

    @torch.no_grad()
    def denoise(self, cache: PrefixCache, noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
        """Integrate the flow from noise (t = 1) to actions (t = 0) in `num_steps` Euler steps."""
        times, dt = euler_times(num_steps)
        x = noise.to(torch.float32)
        for t in times:
            v = self.denoise_step(cache, x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))
            x = x + dt * v
        return x
