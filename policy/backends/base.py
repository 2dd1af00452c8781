"""The sampler contract every backend implements (as `policy.base.Policy` is the policies').

    sampler = make_sampler("compile", model, num_steps=10)
    actions = sampler(images, image_masks, tokens, token_masks, noise)   # (B, chunk, action_dim) fp32
    handle = sampler.encode(images, image_masks, tokens, token_masks)  # vision + prefix (KV cache)
    actions = sampler.denoise(handle, noise)                           # the Euler loop alone

Inputs as `Pi05Model.sample_actions` takes them (policy/pi05/model.py): images, the 3 camera slots
(B, 3, 224, 224) float in [-1, 1]; image_masks, bool (B,) per slot; tokens int64 (B, L) with
token_masks bool (B, L); noise (B, chunk, action_dim). Masks may be host tensors (or numpy arrays)
while the rest lies on the model's device: the samplers read the masks' shape information (camera
slots present, prompt length) on the host, so masks that are already there cost no device sync.

`stages` is for the benchmark: one callable per stage ("vision", "prefix", "denoise") running it
alone on inputs prepared once. `graphs=False` runs a stage's kernels one by one (no CUDA graph), so a
profiler can see each; backends without graphs ignore it. Samplers with fused kernels may also have
`kernel_status` (kernel -> "ok: ..." or "fallback: ..."), which the benchmark reports.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Sampler(Protocol):
    name: str  # the backend's registry name
    num_steps: int  # Euler steps per sample

    def encode(self, images, image_masks, tokens, token_masks) -> Any: ...

    def denoise(self, handle: Any, noise: torch.Tensor) -> torch.Tensor: ...

    def stages(self, images, image_masks, tokens, token_masks, noise, *, graphs: bool = True) -> dict[str, Callable[[], Any]]: ...

    def __call__(self, images, image_masks, tokens, token_masks, noise) -> torch.Tensor: ...
