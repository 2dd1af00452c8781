"""Fast backends: each turns a loaded Pi05Model into a sampler with the same inputs and outputs.

    sampler = make_sampler("compile", model, num_steps=10)
    actions = sampler(images, image_masks, tokens, token_masks, noise)   # (B, chunk, action_dim) fp32

Every sampler implements the `Sampler` protocol (policy/backends/base.py): `__call__`, `encode`,
`denoise`, `stages`, `name`, `num_steps`. Backends are chosen by name, never by flags inside the model.
"""

from __future__ import annotations

import importlib

from policy.backends.base import Sampler

# name -> "module:factory"; modules are imported on use (optional dependencies stay optional).
BACKENDS = {
    "eager": "policy.backends.eager:EagerSampler",
    "compile": "policy.backends.compiled:CompiledSampler",
    "fp8": "policy.backends.fp8:Fp8Sampler",
    "tensorrt": "policy.backends.tensorrt:TensorRTSampler",
}


def get_backend(name: str):
    """The sampler class of backend `name`, or a ValueError listing the choices."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown Pi0.5 backend {name!r}; choose one of {', '.join(BACKENDS)}") from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def make_sampler(name: str, model, num_steps: int = 10, **options) -> Sampler:
    """Backend `name`'s sampler over `model`; `options` are that backend's keyword arguments."""
    return get_backend(name)(model, num_steps=num_steps, **options)


__all__ = ["BACKENDS", "Sampler", "get_backend", "make_sampler"]
