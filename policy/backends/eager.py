"""The reference backend: the model's own PyTorch code, op by op (policy/pi05/model.py)."""

from __future__ import annotations

import torch

from policy.backends.rtc import Guide, guided_velocity
from policy.pi05.model import Pi05Model, PrefixCache, as_slots, euler_times


class EagerSampler:
    name = "eager"
    supports_rtc = True

    def __init__(self, model: Pi05Model, num_steps: int = 10):
        self.model = model
        self.num_steps = int(num_steps)
        euler_times(self.num_steps)  # validates
        self.device = model.llm.embed_tokens.weight.device

    def _masks(self, image_masks, token_masks):
        """Masks on the model's device (callers may pass host masks, as the compiled backends prefer)."""
        image_masks = [torch.as_tensor(m).to(self.device) for m in as_slots(image_masks, "image_masks")]
        return image_masks, torch.as_tensor(token_masks).to(self.device)

    @torch.no_grad()
    def encode(self, images, image_masks, tokens, token_masks) -> PrefixCache:
        image_masks, token_masks = self._masks(image_masks, token_masks)
        return self.model.prefill(self.model.embed_prefix(images, image_masks, tokens, token_masks))

    def denoise(self, cache: PrefixCache, noise: torch.Tensor, guide: Guide | None = None) -> torch.Tensor:
        """Euler steps from noise to actions; with `guide`, real-time chunking (policy/backends/rtc.py)."""
        if guide is None or not guide.active:
            return self.model.denoise(cache, noise, self.num_steps)
        times, dt = euler_times(self.num_steps)
        x = noise.to(torch.float32)
        for t in times:
            tt = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
            v = guided_velocity(lambda z: self.model.denoise_step(cache, z, tt), x, t, guide.target, guide.weights,
                                guide.beta)
            x = x + dt * v
        return x

    def stages(self, images, image_masks, tokens, token_masks, noise, *, graphs: bool = True) -> dict:
        """Callables that each run one stage alone on prepared inputs (for the benchmark); eager has no
        graphs, so `graphs` changes nothing."""
        m = self.model
        images = as_slots(images, "images")
        image_masks, token_masks = self._masks(image_masks, token_masks)
        present = [img for img, mask in zip(images, image_masks) if bool(mask.any())]
        with torch.no_grad():
            prefix = m.embed_prefix(images, image_masks, tokens, token_masks)
            cache = m.prefill(prefix)
        no_grad = torch.no_grad()
        return {
            "vision": no_grad(lambda: m.embed_images(present)),
            "prefix": no_grad(lambda: m.prefill(prefix)),
            "denoise": lambda: self.denoise(cache, noise),
        }

    def __call__(self, images, image_masks, tokens, token_masks, noise, guide: Guide | None = None) -> torch.Tensor:
        return self.denoise(self.encode(images, image_masks, tokens, token_masks), noise, guide)
