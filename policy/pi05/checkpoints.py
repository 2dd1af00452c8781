"""Finding and reading Pi0.5 checkpoints: openpi PyTorch (`model.safetensors`), lerobot's
`model.`-prefixed conversions, and openpi's JAX/orbax directories (through jax_checkpoint.py).

openpi: policy_config.create_trained_policy (a checkpoint directory holds the weights and
`assets/<asset_id>/norm_stats.json`), shared/download.py (the cache root `$OPENPI_DATA_HOME`,
default ~/.cache/openpi). Names, shapes and dtypes are weights.py's; this module only finds files,
tells their format apart, checks them and hands the tensors over.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
import struct
from pathlib import Path

import torch

from policy.pi05.config import Pi05Config, get_config
from policy.pi05.model import Pi05Model
from policy.pi05.weights import build_model, check_tensors, expected_tensors, load_state, normalize_keys, our_name, \
    random_model

log = logging.getLogger(__name__)

CHECKPOINT_HELP = (
    "Pi0.5 weights are not downloaded by this project. Get openpi's checkpoint, e.g. "
    "`gsutil -m cp -r gs://openpi-assets/checkpoints/pi05_libero ~/.cache/openpi/openpi-assets/checkpoints/` "
    "(an openpi JAX checkpoint directory is read directly; `python -m policy.convert SRC DST` makes a faster-"
    "loading PyTorch copy), or a published PyTorch conversion (a directory with model.safetensors), and pass "
    "its path as checkpoint=..."
)
FORMATS = ("pytorch", "jax")


def openpi_data_home() -> Path:
    """openpi's cache root: $OPENPI_DATA_HOME, default ~/.cache/openpi (checkpoints, tokenizer)."""
    return Path(os.environ.get("OPENPI_DATA_HOME", Path.home() / ".cache" / "openpi")).expanduser()


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "params" / "_METADATA").is_file()


def checkpoint_format(path: Path) -> str:
    """`jax` for an orbax directory without a PyTorch copy beside it, else `pytorch`."""
    if path.is_dir() and (path / "params" / "_METADATA").is_file() and not (path / "model.safetensors").is_file():
        return "jax"
    return "pytorch"


def is_lerobot_checkpoint(path: Path) -> bool:
    """lerobot's pi05 conversions: every key prefixed `model.`, and processor files beside the weights."""
    if path.is_dir() and any(path.glob("policy_preprocessor*")):
        return True
    if checkpoint_format(path) != "pytorch":
        return False
    file = path / "model.safetensors" if path.is_dir() else path
    keys = [k for k in json.loads(_safetensors_header(file)) if k != "__metadata__"]
    return bool(keys) and all(k.startswith("model.") for k in keys)


def find_checkpoint(name: str = "pi05_libero") -> Path:
    """Default search, following openpi's cache layout: $OPENPI_DATA_HOME/openpi-assets/checkpoints/<name>*."""
    root = openpi_data_home() / "openpi-assets" / "checkpoints"
    candidates = sorted(p for p in root.glob(f"{name}*") if is_checkpoint_dir(p)) if root.is_dir() else []
    if not candidates:
        raise FileNotFoundError(f"no Pi0.5 checkpoint found: looked for {root}/{name}* "
                                f"(set OPENPI_DATA_HOME to move that root). {CHECKPOINT_HELP}")
    # Prefer a PyTorch copy (fast to load) over the JAX original when both exist.
    candidates.sort(key=lambda p: (not (p / "model.safetensors").is_file(), len(p.name)))
    return candidates[0]


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    """The checkpoint `path` names (a directory or a .safetensors file), or the default search for None."""
    if path is None:
        return find_checkpoint()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist. {CHECKPOINT_HELP}")
    if p.is_dir() and not is_checkpoint_dir(p):
        raise FileNotFoundError(f"{p} holds neither model.safetensors (openpi PyTorch) nor params/_METADATA "
                                f"(openpi JAX). {CHECKPOINT_HELP}")
    return p


MAX_ACTION_HORIZON = 1000  # openpi's models predict 10 to 50 actions a call


def checkpoint_config(ckpt_dir: Path, cfg: Pi05Config) -> Pi05Config:
    """openpi's converter writes config.json; the action horizon is not visible in the weights."""
    path = ckpt_dir / "config.json"
    if not path.is_file():
        return cfg
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s (%s): using the config's action horizon %d", path, exc, cfg.chunk_size)
        return cfg
    horizon = meta.get("action_horizon") if isinstance(meta, dict) else None
    if horizon is None:
        return cfg
    if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= MAX_ACTION_HORIZON:
        raise ValueError(f"{path}: action_horizon must be a whole number of actions in 1..{MAX_ACTION_HORIZON}, "
                         f"got {horizon!r}: fix or delete the file (openpi's converter writes the model's horizon)")
    if horizon != cfg.chunk_size:
        log.warning("checkpoint config.json says action_horizon=%d; using it instead of %d", horizon, cfg.chunk_size)
        cfg = cfg.replace(chunk_size=horizon)
    return cfg


def _safetensors_header(file: Path) -> bytes:
    """The JSON header of a safetensors file, checked against the file's size (a truncated download
    fails here, naming the file, instead of deep inside the reader)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is not a safetensors file ({size} bytes): re-copy or re-convert it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise ValueError(f"{file} is truncated or not a safetensors file (header of {n} bytes, file of {size}): "
                             f"re-copy or re-convert it")
        header = f.read(n)
    try:
        entries = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} has a corrupt safetensors header ({exc}): re-copy or re-convert it") from None
    try:
        end = max((int(e["data_offsets"][1]) for k, e in entries.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise ValueError(f"{file} has a corrupt safetensors header ({type(exc).__name__}: {exc}): re-copy or "
                         f"re-convert it") from None
    if 8 + n + end > size:
        raise ValueError(f"{file} is truncated: its header describes {8 + n + end} bytes, the file has {size}. "
                         f"Re-copy or re-convert it.")
    return header


IDENTITY_SAMPLES = 1024  # windows read from the weight bytes (16 MiB in all): see checkpoint_identity
IDENTITY_WINDOW = 16 * 2**10


def _weight_files(p: Path, fmt: str) -> list[Path]:
    if fmt == "jax":
        return sorted(f for f in (p / "params").rglob("*") if f.is_file())
    return [p / "model.safetensors" if p.is_dir() else p]


def content_digest(files: list[Path], root: Path) -> str:
    """sha256 over each file's name (relative to root) and size, and IDENTITY_SAMPLES windows of
    IDENTITY_WINDOW bytes spread evenly over all their bytes taken as one stream (a file smaller than
    all the windows together is read whole). The windows are 1/IDENTITY_SAMPLES of the bytes apart, so a
    change to any contiguous run longer than that (a fine-tune changes far more) gives another digest, at
    the cost of 16 MiB of reads rather than the checkpoint's gigabytes."""
    h = hashlib.sha256()
    sizes = [f.stat().st_size for f in files]
    for f, n in zip(files, sizes):
        h.update(f"{f.relative_to(root)}\0{n}\n".encode())
    total = sum(sizes)
    if total <= IDENTITY_SAMPLES * IDENTITY_WINDOW:
        starts = range(0, total, IDENTITY_WINDOW)  # everything
    else:
        starts = [(total - IDENTITY_WINDOW) * i // (IDENTITY_SAMPLES - 1) for i in range(IDENTITY_SAMPLES)]
    offsets = list(itertools.accumulate(sizes, initial=0))  # file i holds stream bytes [offsets[i], offsets[i + 1])
    current, f = -1, None  # the windows ascend: one file open at a time
    try:
        for start in starts:  # a window may span the end of one file and the start of the next
            pos, left = start, min(IDENTITY_WINDOW, total - start)
            while left > 0:
                i = bisect.bisect_right(offsets, pos) - 1
                if i != current:
                    if f is not None:
                        f.close()
                    current, f = i, open(files[i], "rb")
                f.seek(pos - offsets[i])
                chunk = f.read(min(left, offsets[i + 1] - pos))
                if not chunk:
                    raise ValueError(f"{files[i]} changed size while it was read: re-run when it is complete")
                h.update(chunk)
                pos, left = pos + len(chunk), left - len(chunk)
    finally:
        if f is not None:
            f.close()
    return h.hexdigest()


def checkpoint_identity(path: str | os.PathLike | None) -> dict[str, str] | None:
    """What identifies a checkpoint's weights, with its path and format: the sha256 of its layout (the
    safetensors header, or the JAX `_METADATA`) and of its bytes, sampled (`content_digest`): two
    checkpoints of one size (two fine-tunes of pi05_libero) share a layout, so the layout alone does not
    tell them apart. None for random weights; `path=None` is the default search's checkpoint."""
    if path is not None and str(path) == "random":
        return None
    p = resolve_checkpoint(path)
    fmt = checkpoint_format(p)
    files = _weight_files(p, fmt)
    if fmt == "jax":
        layout = (p / "params" / "_METADATA").read_bytes()
    else:
        layout = _safetensors_header(files[0])
    root = p if p.is_dir() else p.parent
    h = hashlib.sha256(layout)
    h.update(content_digest(files, root).encode())
    return {"path": str(p.resolve()), "format": fmt, "sha256": h.hexdigest()}


def _load_safetensors(file: Path, cfg: Pi05Config, device, dtype) -> Pi05Model:
    from safetensors import safe_open

    _safetensors_header(file)
    model = build_model(cfg)
    expected = expected_tensors(model)
    with safe_open(str(file), framework="pt") as f:
        mapping = normalize_keys(f.keys())
        found = {mapping[k]: tuple(f.get_slice(k).get_shape()) for k in mapping}
        check_tensors(expected, found, str(file), {mapping[k]: f.get_slice(k).get_dtype() for k in mapping})
        tensors = {our_name(key): f.get_tensor(k) for k, key in mapping.items()}
    return load_state(model, tensors, device, dtype, str(file))


def load_model(path: str | os.PathLike | None = None, config: str | Pi05Config = "pi05_libero",
               device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.bfloat16) -> Pi05Model:
    """Load Pi0.5 from an openpi checkpoint.

    path:   a directory with `model.safetensors` (openpi PyTorch, or lerobot's `model.`-prefixed
            keys), the `.safetensors` file itself, an openpi JAX checkpoint directory (`params/_METADATA`),
            "random" for randomly initialised weights (benchmarks, smoke runs; says so loudly), or None
            to search $OPENPI_DATA_HOME/openpi-assets/checkpoints/pi05_libero* (default ~/.cache/openpi).
    config: a preset name ("pi05_libero", "pi05_base", "tiny") or a Pi05Config; the checkpoint's
            config.json, when present, sets the action horizon.
    dtype:  compute dtype; openpi's fp32 parameter set stays fp32 (bf16 by default, as openpi serves).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(path, str) and path == "random":
        return random_model(config, device=device, dtype=dtype)
    p = resolve_checkpoint(path)
    cfg = get_config(config)
    if checkpoint_format(p) == "jax":
        from policy.pi05.jax_checkpoint import load_jax_checkpoint

        return load_jax_checkpoint(p, cfg, device=device, dtype=dtype)
    if p.is_dir():
        cfg = checkpoint_config(p, cfg)
    return _load_safetensors(p / "model.safetensors" if p.is_dir() else p, cfg, device, dtype)
