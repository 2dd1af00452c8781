"""Example model inputs: a batch shaped as LIBERO feeds Pi0.5, for benchmarks, calibration and tests.

openpi: policies/libero_policy.py `make_libero_example` (random images and a prompt for a dummy
observation). Here the model-side tensors directly: two cameras (the right wrist slot is padding, as
in LIBERO), a prompt of `prompt_tokens` ids (BOS first) right-padded to `max_token_len`, and noise.
"""

from __future__ import annotations

from typing import Sequence

import torch

from policy.pi05.config import CAMERA_SLOTS, Pi05Config

BOS = 2  # PaliGemma's (and our test tokenizer's) begin-of-sequence id


def example_inputs(cfg: Pi05Config, batch: int = 1, prompt_tokens: int = 24, device="cpu", seed: int = 0,
                   images: Sequence[torch.Tensor] | None = None, prompt_ids: Sequence[int] | None = None):
    """(images, image_masks, tokens, token_masks, noise) on `device`, as `Pi05Model.sample_actions` and
    every sampler take them. Random pixels and prompt ids (seeded) unless `images` (the two present
    slots, each (3, H, W) or (1, 3, H, W) in [-1, 1]) or `prompt_ids` (a tokenized prompt, BOS first)
    are given; every row of the batch then holds the same observation."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = cfg.image_size
    # three draws (the third then overwritten) keep the random stream of earlier benchmark runs
    pixels = [torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for _ in range(3)]
    if images is not None:
        pixels[:2] = [img.reshape(1, 3, size, size).float().cpu().expand(batch, 3, size, size).clone() for img in images]
    pixels[2].fill_(-1.0)  # LIBERO: the right wrist slot is padding
    masks = [torch.ones(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool)]
    assert len(pixels) == len(masks) == len(CAMERA_SLOTS)
    tokens = torch.zeros(batch, cfg.max_token_len, dtype=torch.long)
    if prompt_ids is None:
        tokens[:, :prompt_tokens] = torch.randint(3, cfg.vocab_size, (batch, prompt_tokens), generator=g)
        tokens[:, 0] = BOS
    else:
        ids = torch.as_tensor(list(prompt_ids)[: cfg.max_token_len], dtype=torch.long)
        tokens[:, : len(ids)] = ids
    token_masks = tokens != 0
    noise = torch.randn(batch, cfg.chunk_size, cfg.action_dim, generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    return [to(x) for x in pixels], [to(m) for m in masks], to(tokens), to(token_masks), to(noise)
