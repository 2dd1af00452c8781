"""Turning the `policy` config group into a policy object, and choosing the device."""

from __future__ import annotations

import os

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig


def resolve_device(device: str) -> str:
    """`auto` means cuda if available, else cpu. In a multirun, job k gets GPU (k mod #GPUs), so a
    local joblib sweep spreads over the machine's GPUs (under Slurm each job sees only its own)."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    job = 0
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        if str(hc.mode) == "RunMode.MULTIRUN":
            job = int(hc.job.num)
    except (ValueError, ImportError):
        pass
    return f"cuda:{job % torch.cuda.device_count()}"


def build_policy(cfg: DictConfig):
    """Instantiate `cfg.policy` (a `_target_` config). Policies that take a device get the resolved one."""
    kwargs = {}
    if "device" in cfg.policy:
        kwargs["device"] = resolve_device(str(cfg.policy.device))
    try:
        return instantiate(cfg.policy, **kwargs)
    except InstantiationException as exc:
        # Hydra wraps the policy's own error (a missing checkpoint, say); show the user that one.
        if exc.__cause__ is not None:
            raise exc.__cause__ from None
        raise
