"""Every policy the runner can talk to, behind one two-method interface (`policy.base.Policy`).

Pi0.5 lives in `policy.pi05` and its fast backends in `policy.backends`; they import torch, so
they are loaded on first use: `import policy` stays cheap for simulator workers.
"""

from policy.base import ACTION_DIM, Policy, check_actions

_LAZY = {
    "Pi05Config": "policy.pi05.config",
    "PI05_PRESETS": "policy.pi05.config",
    "Pi05Model": "policy.pi05.model",
    "load_model": "policy.pi05.checkpoints",
    "Pi05Policy": "policy.libero_policy",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'policy' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["ACTION_DIM", "Policy", "check_actions", *_LAZY]
