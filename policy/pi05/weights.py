"""Pi0.5 parameters by openpi's names: key mapping, dtypes, the mismatch report, random weights.

openpi's PyTorch checkpoint (`model.safetensors`, 812 tensors for pi05, written by
`safetensors.torch.save_model` from `PI0Pytorch`) names every parameter; ours map one-to-one
through a prefix table. Quirks handled here, and nowhere else:

* the token embedding is tied: the file stores `paligemma_with_expert.paligemma.lm_head.weight`
  and drops `...language_model.embed_tokens.weight` (either is accepted);
* `paligemma_with_expert.gemma_expert.lm_head.weight` is stored but unused (random): ignored;
* lerobot's conversions prefix every key with `model.`: accepted;
* openpi serves in bf16 except a set of fp32 parameters (patch and position embeddings, every
  RMS/adaRMS norm including the adaRMS Dense layers, and the four small heads): kept in fp32.

Finding and reading checkpoint files is policy/pi05/checkpoints.py's job; this module only knows
names, shapes and dtypes, so both file formats (checkpoints.py, jax_checkpoint.py) build on it.
"""

from __future__ import annotations

import logging
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

def openpi_key(name: str) -> str:
    """Our parameter name -> openpi's checkpoint key."""
    if name == "llm.embed_tokens.weight":
        return TIED_EMBEDDING
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(f"parameter {name!r} has no openpi checkpoint key (is it a Pi05Model parameter?)")


def our_name(key: str) -> str:
    """openpi's checkpoint key -> our parameter name."""
    if key in (TIED_EMBEDDING, UNTIED_EMBEDDING):
        return "llm.embed_tokens.weight"
    for ours, theirs in _PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    raise KeyError(f"checkpoint key {key!r} is not a Pi0.5 parameter")


def keeps_fp32(name: str) -> bool:
    """Whether openpi serves this parameter in fp32 (everything else is bf16)."""
    return any(m in name for m in _FP32_MARKERS)


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if keeps_fp32(name) else dtype


class CheckpointMismatch(ValueError):
    pass


# the weight dtypes a checkpoint may store, as safetensors and numpy name them: floats, which load_state
# casts to the compute dtype (an integer or FP8 tensor would be cast to nonsense without its scales)
FLOAT_DTYPES = frozenset({"F32", "BF16", "F16", "float32", "bfloat16", "float16"})


def check_tensors(expected: dict[str, tuple], found: dict[str, tuple], source: str,
                  dtypes: dict[str, str] | None = None) -> None:
    """One error listing every missing, unexpected, mis-shaped and non-float tensor (openpi key names);
    `dtypes`: the found tensors' stored dtypes (safetensors or numpy names)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    kinds = sorted(k for k, d in (dtypes or {}).items() if k in expected and str(d) not in FLOAT_DTYPES)
    if not (missing or extra or shapes or kinds):
        return
    lines = [f"{source} does not match the Pi0.5 model ({len(missing)} missing, {len(extra)} unexpected, "
             f"{len(shapes)} with the wrong shape, {len(kinds)} not floating point):"]
    lines += [f"  missing: {k} {list(expected[k])}" for k in missing[:50]]
    lines += [f"  unexpected: {k} {list(found[k])}" for k in extra[:50]]
    lines += [f"  wrong shape: {k}: checkpoint {list(found[k])}, model {list(expected[k])}" for k in shapes[:50]]
    lines += [f"  wrong dtype: {k}: checkpoint {dtypes[k]}, weights must be float32, bfloat16 or float16" for k in kinds[:50]]
    if max(len(missing), len(extra), len(shapes), len(kinds)) > 50:
        lines.append("  ... (lists cut at 50)")
    lines.append("Check that the checkpoint is a pi05 model and that `config` matches its sizes "
                 "(presets: pi05_libero, pi05_base, tiny)" + ("; a quantized checkpoint needs its own loader: "
                 "load the float one and pick backend=fp8." if kinds else "."))
    raise CheckpointMismatch("\n".join(lines))


def expected_tensors(model: nn.Module) -> dict[str, tuple]:
    """openpi key -> shape for every parameter of `model` (works on the meta device)."""
    return {openpi_key(n): tuple(p.shape) for n, p in model.state_dict().items()}


def normalize_keys(keys: Iterable[str]) -> dict[str, str]:
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


def load_state(model: Pi05Model, tensors: dict[str, torch.Tensor], device, dtype: torch.dtype,
               source: str | None = None) -> Pi05Model:
    """Assign tensors (keyed by our names) to a meta-device model, in openpi's dtypes. From a checkpoint
    (`source`, its path), a tensor with NaN or infinite values (a corrupt copy, a diverged run) is refused
    by name rather than giving NaN actions."""
    state = {n: t.to(device=device, dtype=parameter_dtype(n, dtype)) for n, t in tensors.items()}
    bad = [n for n, t in state.items() if not bool(torch.isfinite(t).all())] if source is not None else []
    if bad:
        raise CheckpointMismatch(f"{source} holds NaN or infinite values in {len(bad)} tensors: {', '.join(bad[:10])}"
                                 f"{' ...' if len(bad) > 10 else ''}. Re-copy the checkpoint, or check the run that wrote it.")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


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
