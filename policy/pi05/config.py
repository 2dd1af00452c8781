"""Pi0.5 sizes: one dataclass, and a table of named presets.

openpi: src/openpi/models/pi0_config.py (Pi0Config, pi05=True), gemma.py get_config ("gemma_2b",
"gemma_300m"), siglip.py ("So400m/14"); training/config.py for pi05_libero (action_horizon=10,
discrete_state_input=False). The `tiny` preset is the golden test model (shared/golden/pi05).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CAMERA_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's order


@dataclass(frozen=True)
class Pi05Config:
    # SigLIP vision tower
    vision_width: int = 1152
    vision_depth: int = 27
    vision_heads: int = 16
    vision_mlp_dim: int = 4304
    patch_size: int = 14
    image_size: int = 224
    # Gemma 2B: the prefix (images + prompt)
    width: int = 2048
    depth: int = 18  # also the action expert's depth: their layers attend together
    mlp_dim: int = 16384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257152
    # Gemma 300M action expert (same heads and head_dim as the prefix)
    expert_width: int = 1024
    expert_mlp_dim: int = 4096
    # actions and prompt
    action_dim: int = 32
    chunk_size: int = 10  # openpi: action_horizon
    max_token_len: int = 200
    discrete_state_input: bool = False  # pi05_libero: False (state is neither in the prompt nor the suffix)
    # numerics
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    min_period: float = 4e-3
    max_period: float = 4.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_prefix_len(self) -> int:
        return len(CAMERA_SLOTS) * self.num_patches + self.max_token_len

    def replace(self, **changes) -> "Pi05Config":
        return dataclasses.replace(self, **changes)


PI05_PRESETS: dict[str, Pi05Config] = {
    "pi05_libero": Pi05Config(),
    "pi05_base": Pi05Config(chunk_size=50, discrete_state_input=True),
    "tiny": Pi05Config(
        vision_width=64, vision_depth=2, vision_heads=4, vision_mlp_dim=128,
        width=64, depth=2, mlp_dim=128, head_dim=16, vocab_size=1024,
        expert_width=32, expert_mlp_dim=64,
    ),
}


def get_config(config: str | Pi05Config, **overrides) -> Pi05Config:
    """A preset by name (or a config as is), with keyword overrides."""
    if isinstance(config, Pi05Config):
        base = config
    else:
        try:
            base = PI05_PRESETS[config]
        except KeyError:
            raise ValueError(f"unknown Pi0.5 config {config!r}; presets: {', '.join(PI05_PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
