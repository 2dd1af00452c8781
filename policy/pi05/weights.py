"""Loading Pi0.5 weights: openpi's PyTorch checkpoints (and JAX ones, see jax_checkpoint.py).

openpi's PyTorch checkpoint is a directory with `model.safetensors` (812 tensors for pi05, written
by `safetensors.torch.save_model` from `PI0Pytorch`), `config.json` and `assets/<id>/norm_stats.json`.
Quirks handled here, and nowhere else:

* the token embedding is tied: the file stores `paligemma_with_expert.paligemma.lm_head.weight`
  and drops `...language_model.embed_tokens.weight` (either is accepted);
* `paligemma_with_expert.gemma_expert.lm_head.weight` is stored but unused (random): ignored;
* lerobot's conversions prefix every key with `model.`: accepted;
* openpi serves in bf16 except a set of fp32 parameters (patch and position embeddings, every
  RMS/adaRMS norm including the adaRMS Dense layers, and the four small heads): kept in fp32.

Every key and shape is checked; all problems are reported in one error (no silent strict=False).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from policy.pi05.config import Pi05Config, get_config
from policy.pi05.model import Pi05Model

log = logging.getLogger(__name__)

# (our module prefix, openpi key prefix); the first match wins.
_PREFIXES = (
    ("vision.", "paligemma_with_expert.paligemma.model.vision_tower.vision_model."),
    ("projector.", "paligemma_with_expert.paligemma.model.multi_modal_projector."),
    ("llm.", "paligemma_with_expert.paligemma.model.language_model."),
    ("expert.", "paligemma_with_expert.gemma_expert.model."),
    ("", ""),
)
TIED_EMBEDDING = "paligemma_with_expert.paligemma.lm_head.weight"
UNTIED_EMBEDDING = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
IGNORED_KEYS = frozenset({"paligemma_with_expert.gemma_expert.lm_head.weight"})
_FP32_MARKERS = ("vision.embeddings.", "input_layernorm", "post_attention_layernorm", "llm.norm.", "expert.norm.",
                 "action_in_proj.", "action_out_proj.", "time_mlp_in.", "time_mlp_out.")

CHECKPOINT_HELP = (
    "Pi0.5 weights are not downloaded by this project. Get openpi's checkpoint, e.g. "
    "`gsutil -m cp -r gs://openpi-assets/checkpoints/pi05_libero ~/.cache/openpi/openpi-assets/checkpoints/` "
    "(an openpi JAX checkpoint directory is read directly; `python -m policy.convert SRC DST` makes a faster-"
    "loading PyTorch copy), or a published PyTorch conversion (a directory with model.safetensors), and pass "
    "its path as checkpoint=..."
)


def openpi_key(name: str) -> str:
    """Our parameter name -> openpi's checkpoint key."""
    if name == "llm.embed_tokens.weight":
        return TIED_EMBEDDING
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise AssertionError(name)


def our_name(key: str) -> str:
    """openpi's checkpoint key -> our parameter name."""
    if key in (TIED_EMBEDDING, UNTIED_EMBEDDING):
        return "llm.embed_tokens.weight"
    for ours, theirs in _PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    raise AssertionError(key)


def keeps_fp32(name: str) -> bool:
    """Whether openpi serves this parameter in fp32 (everything else is bf16)."""
    return any(m in name for m in _FP32_MARKERS)


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if keeps_fp32(name) else dtype


def openpi_data_home() -> Path:
    return Path(os.environ.get("OPENPI_DATA_HOME", Path.home() / ".cache" / "openpi")).expanduser()


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


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "params" / "_METADATA").is_file()


def _checkpoint_config(ckpt_dir: Path, cfg: Pi05Config) -> Pi05Config:
    """openpi's converter writes config.json; the action horizon is not visible in the weights."""
    path = ckpt_dir / "config.json"
    if not path.is_file():
        return cfg
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return cfg
    horizon = meta.get("action_horizon")
    if isinstance(horizon, int) and horizon != cfg.chunk_size:
        log.warning("checkpoint config.json says action_horizon=%d; using it instead of %d", horizon, cfg.chunk_size)
        cfg = cfg.replace(chunk_size=horizon)
    return cfg


class CheckpointMismatch(ValueError):
    pass


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor (openpi key names)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or extra or shapes):
        return
    lines = [f"{source} does not match the Pi0.5 model ({len(missing)} missing, {len(extra)} unexpected, "
             f"{len(shapes)} with the wrong shape):"]
    lines += [f"  missing: {k} {list(expected[k])}" for k in missing[:50]]
    lines += [f"  unexpected: {k} {list(found[k])}" for k in extra[:50]]
    lines += [f"  wrong shape: {k}: file {list(found[k])}, model {list(expected[k])}" for k in shapes[:50]]
    if max(len(missing), len(extra), len(shapes)) > 50:
        lines.append("  ... (lists cut at 50)")
    lines.append("Check that the checkpoint is a pi05 model and that `config` matches its sizes "
                 "(presets: pi05_libero, pi05_base, tiny).")
    raise CheckpointMismatch("\n".join(lines))


def expected_tensors(model: nn.Module) -> dict[str, tuple]:
    """openpi key -> shape for every parameter of `model` (works on the meta device)."""
    return {openpi_key(n): tuple(p.shape) for n, p in model.state_dict().items()}


def _normalize_keys(keys: Iterable[str]) -> dict[str, str]:
    """file key -> openpi key: strips lerobot's `model.` prefix, drops ignored keys, resolves the tie."""
    keys = list(keys)
    strip = bool(keys) and all(k.startswith("model.") for k in keys)
    out = {}
    for k in keys:
        key = k[len("model."):] if strip else k
        if key in IGNORED_KEYS:
            continue
        if key == UNTIED_EMBEDDING:
            if any(x.endswith(TIED_EMBEDDING) for x in keys):
                continue  # both stored: the tied name wins
            key = TIED_EMBEDDING
        out[k] = key
    return out


def build_model(config: str | Pi05Config = "pi05_libero", device="meta") -> Pi05Model:
    with torch.device(device):
        return Pi05Model(get_config(config))


def load_state(model: Pi05Model, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype) -> Pi05Model:
    """Assign tensors (keyed by our names) to a meta-device model, in openpi's dtypes."""
    state = {n: t.to(device=device, dtype=parameter_dtype(n, dtype)) for n, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _load_safetensors(path: Path, cfg: Pi05Config, device, dtype) -> Pi05Model:
    from safetensors import safe_open

    model = build_model(cfg)
    expected = expected_tensors(model)
    with safe_open(str(path), framework="pt") as f:
        mapping = _normalize_keys(f.keys())
        found = {mapping[k]: tuple(f.get_slice(k).get_shape()) for k in mapping}
        check_tensors(expected, found, str(path))
        tensors = {our_name(key): f.get_tensor(k) for k, key in mapping.items()}
    return load_state(model, tensors, device, dtype)


def resolve_checkpoint(path: str | os.PathLike | None) -> Path:
    if path is None:
        return find_checkpoint()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist. {CHECKPOINT_HELP}")
    if p.is_dir() and not is_checkpoint_dir(p):
        raise FileNotFoundError(f"{p} holds neither model.safetensors (openpi PyTorch) nor params/_METADATA "
                                f"(openpi JAX). {CHECKPOINT_HELP}")
    return p


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
    if p.is_dir() and (p / "params" / "_METADATA").is_file() and not (p / "model.safetensors").is_file():
        from policy.pi05.jax_checkpoint import load_jax_checkpoint

        return load_jax_checkpoint(p, cfg, device=device, dtype=dtype)
    file = p / "model.safetensors" if p.is_dir() else p
    if p.is_dir():
        cfg = _checkpoint_config(p, cfg)
    return _load_safetensors(file, cfg, device, dtype)


def init_random_(model: Pi05Model, seed: int = 0) -> Pi05Model:
    """The golden test model's recipe: matrices N(0, 1/fan_in), embeddings N(0, 1/width), norms and
    biases N(0, 0.1^2), LayerNorm scales 1 + N(0, 0.1^2). Keeps activations O(1) at any size."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        shape, dev = p.shape, p.device
        g = gens.setdefault(dev, torch.Generator(device=dev).manual_seed(seed))
        if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or name.endswith("post_layernorm.weight"):
            values = 1 + 0.1 * torch.randn(shape, generator=g, device=dev)
        elif p.ndim >= 2 and "embed" not in name:
            fan_in = shape[1] * (shape[2] * shape[3] if p.ndim == 4 else 1)
            values = torch.randn(shape, generator=g, device=dev) / fan_in ** 0.5
        elif "embed" in name and p.ndim == 2:
            values = torch.randn(shape, generator=g, device=dev) / shape[-1] ** 0.5
        else:
            values = 0.1 * torch.randn(shape, generator=g, device=dev)
        with torch.no_grad():
            p.copy_(values.to(p.dtype))
    return model


def random_model(config: str | Pi05Config = "pi05_libero", seed: int = 0, device="cpu",
                 dtype: torch.dtype = torch.bfloat16) -> Pi05Model:
    """Pi0.5 with RANDOM weights, for benchmarks and smoke runs. Its actions mean nothing."""
    log.warning("Pi0.5 with RANDOM weights (checkpoint='random'): for speed tests only, actions are meaningless")
    model = build_model(config, device="meta")
    tensors = {n: torch.empty(p.shape, dtype=parameter_dtype(n, dtype), device=device)
               for n, p in model.state_dict().items()}
    model = load_state(model, tensors, device, dtype)
    return init_random_(model, seed)
