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


REMOTE_TARGET = "policy.remote.RemotePolicy"
PI05_TARGET = "policy.libero_policy.Pi05Policy"


def is_remote(cfg: DictConfig) -> bool:
    return str(cfg.policy.get("_target_", "")) == REMOTE_TARGET


def policy_identity(cfg: DictConfig, policy=None) -> dict | None:
    """What, beyond the config, decides the policy's actions: the weights' identity for Pi0.5 (a
    checkpoint's content, not its path; read without loading it), the server's own account of itself
    for a remote policy (its model, steps and backend; its host and port are not part of it)."""
    target = str(cfg.policy.get("_target_", ""))
    if target == PI05_TARGET:
        from policy.pi05.checkpoints import checkpoint_identity

        ident = checkpoint_identity(cfg.policy.get("checkpoint"))
        return None if ident is None else {"checkpoint_sha256": ident["sha256"], "checkpoint_format": ident["format"]}
    if policy is not None and getattr(policy, "identity", None) is not None:
        return dict(policy.identity)
    return None


def explicit_overrides() -> set[str]:
    """The config keys set on the command line (empty outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ValueError, ImportError):
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}
