"""Fast backends: each turns a loaded Pi05Model into a sampler with the same inputs and outputs.

    sampler = make_sampler("compile", model, num_steps=10)
    actions = sampler(images, image_masks, tokens, token_masks, noise)   # (B, chunk, action_dim) fp32

Every sampler implements the `Sampler` protocol (policy/backends/base.py): `__call__`, `encode`,
`denoise`, `stages`, `name`, `num_steps`. Backends are chosen by name, never by flags inside the model.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

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


# constructor arguments that are not settings a user picks (the policy and the bench pass them, or they are hooks)
NOT_OPTIONS = frozenset({"self", "model", "num_steps", "linear", "calibration", "tokenizer"})
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def backend_options(name: str) -> dict[str, inspect.Parameter]:
    """The options backend `name` takes: its sampler's keyword arguments and, where it passes `**options`
    on, its base classes' (fp8 and tensorrt take compile's)."""
    options: dict[str, inspect.Parameter] = {}
    for cls in get_backend(name).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in NOT_OPTIONS:
                options.setdefault(p.name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return options


def _coerce(backend: str, key: str, value, param: inspect.Parameter):
    """A string from a command line as the option's type (from its annotation): "0"/"no" must not turn
    a bool option on, as any non-empty string would."""
    if not isinstance(value, str):
        return value
    kind = str(param.annotation)
    low = value.strip().lower()
    if "None" in kind and low in ("none", "null"):
        return None
    try:
        if kind.startswith("bool"):
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        raise ValueError(f"backend {backend!r} option {key}={value!r} is not a valid {kind}") from None
    return value


def check_options(name: str, options: dict | None) -> dict:
    """`options` for backend `name`, checked before any weights are read: every key must be one of its
    options (a typo names the closest ones), and strings are read as the option's type."""
    known = backend_options(name)
    out = {}
    for key, value in (options or {}).items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"backend {name!r} has no option {key!r}{hint} Its options: {', '.join(sorted(known))}")
        out[key] = _coerce(name, key, value, known[key])
    return out


def make_sampler(name: str, model, num_steps: int = 10, **options) -> Sampler:
    """Backend `name`'s sampler over `model`; `options` are that backend's keyword arguments."""
    return get_backend(name)(model, num_steps=num_steps, **options)


__all__ = ["BACKENDS", "Sampler", "backend_options", "check_options", "get_backend", "make_sampler"]
