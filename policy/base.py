"""The two-method interface every policy implements, and checks on what policies return.

openpi: openpi_client/base_policy.py (`infer(obs) -> dict`, `reset()`); ours takes a batch.

A batch of observations is a dict of arrays with a leading batch dimension B:
    image        (B, H, W, 3) uint8   agent view, upright (as LiberoEnv returns it)
    wrist_image  (B, H, W, 3) uint8   wrist view, upright
    state        (B, 8) float32       eef position, eef axis-angle, gripper qpos
    prompt       list of B str        the task's language instruction
    privileged   list of B dict       only for policies with `needs_privileged = True`
                                      (see envs/privileged.py)
    episode      list of B hashables  (when the runner knows them) an id per running episode, for
                                      policies that keep per-episode memory
    step         list of B int        (likewise) steps executed so far in each episode
    prev_actions (B, H, 7) float      only for policies with `supports_rtc = True`, under real-time
    prev_frozen  (B,) int             chunking: the previous chunk's actions from this step on (zeros
    prev_overlap (B,) int             past its end), how many of them execute before the new chunk
                                      arrives (to be continued exactly) and how many overlap it
`infer` returns {"actions": (B, chunk_size, 7) float array} plus optional extra keys; an optional
"errors" list of B entries (None or a message) marks rows the policy could not serve.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

ACTION_DIM = 7


@runtime_checkable
class Policy(Protocol):
    chunk_size: int  # actions per call  # openpi: action_horizon
    needs_privileged: bool
    # Optional attributes the runner reads with a default: `needs_images` (True: the runner renders the
    # cameras for the observations it sends), `supports_rtc` (False), `identity` (None: what, besides the
    # config, decides the actions; hashed into the run's config hash), `prepare(max_batch)` (compile
    # ahead of the first episode; returns seconds per batch size).

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]: ...

    def reset(self) -> None: ...


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["prompt"])


def check_actions(out: Any, batch: int) -> tuple[np.ndarray | None, list[str | None]]:
    """Validate a policy output. Returns (actions or None, per-row error message or None).

    A wrong type or shape fails every row; non-finite values fail only the rows that hold them.
    """
    if not isinstance(out, dict) or "actions" not in out:
        return None, [f"policy returned {type(out).__name__} without an 'actions' entry"] * batch
    actions = np.asarray(out["actions"])
    if actions.ndim != 3 or actions.shape[0] != batch or actions.shape[2] != ACTION_DIM or actions.shape[1] < 1:
        msg = f"policy returned actions of shape {actions.shape}, expected ({batch}, chunk, {ACTION_DIM})"
        return None, [msg] * batch
    if not np.issubdtype(actions.dtype, np.number):
        return None, [f"policy returned actions of dtype {actions.dtype}"] * batch
    actions = actions.astype(np.float64)
    finite = np.isfinite(actions).all(axis=(1, 2))
    errors = [None if ok else "policy returned NaN or inf actions" for ok in finite]
    reported = out.get("errors")
    if isinstance(reported, (list, tuple)) and len(reported) == batch:
        errors = [str(r) if r else e for r, e in zip(reported, errors)]
    return actions, errors
