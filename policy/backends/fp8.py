"""The `fp8` backend: the `compile` backend with FP8 (e4m3) weights and activations in the large
matrix products, through `torch._scaled_mm` (Hopper and Ada GPUs).

Which products: every Gemma 2B matrix (the prefix is arithmetic-bound: FP8 doubles the tensor-core
rate), the SigLIP matrices, and the action expert's MLP (its largest weights; halving their bytes
shortens each memory-bound denoise step). Attention score/value products stay bf16.

Scales are static and per tensor: weight scale = amax(|W|) / 448; activation scale = amax / 448 of
that product's input, calibrated by running the backend's own (bf16) computation on calibration
inputs, so the statistics are those of the fused, norm-folded matrices actually quantized. The
statistic is the running max of |x| (what nvidia-modelopt's MaxCalibrator computes with axis=None,
here without the dependency: an earlier ModelOpt code path computed the same number and never ran). Default calibration inputs: a LIBERO frame
pair and that task's instruction (libero_spatial task 0, shipped in calibration/), the instruction
tokenized with the PaliGemma tokenizer when one is found (`tokenizer=PATH`, else openpi's cache
path), else random ids of the same length; pass your own batches with
`calibration=[(images, image_masks, tokens, token_masks), ...]`.

Which matrices: FP8_MATRICES names them per layer kind (fields of policy/backends/fused.py's
NamedTuples); each becomes an `Fp8Matrix` in the sampler's weights.

With `expert_kernels="triton"` the expert MLP's FP8 weights go through the fused expert kernels
(policy/backends/expert_triton.py): dequantized in registers, bf16 activations (weight-only FP8).

`emulate=True` dequantizes instead of calling `_scaled_mm`, so the quantization itself can be
checked on a CPU; it is not fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from policy.backends.compiled import CompiledSampler
from policy.pi05.examples import example_inputs
from policy.pi05.model import Pi05Model

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
# Per layer kind, the matrices (fields of VisionWeights / PrefixWeights / ExpertWeights) that go FP8.
FP8_MATRICES = {
    "vision": ("qkv_w", "o_w", "fc1_w", "fc2_w"),
    "prefix": ("qkv", "o", "gate_up", "down"),
    "expert": ("gate_up", "down"),  # the expert's largest weights; its attention stays bf16
}
CALIBRATION_DIR = Path(__file__).parent / "calibration"


class Fp8Matrix(NamedTuple):
    """A weight matrix as the FP8 products take it."""

    w8: torch.Tensor  # (N, K) float8_e4m3fn
    w_scale: torch.Tensor  # () fp32: W ~ w8 * w_scale
    x_scale: torch.Tensor  # () fp32: the calibrated scale of this product's input


class _Max:
    """Running max of |x| over the calibration batches."""

    def __init__(self):
        self.amax = None

    def collect(self, x):
        a = x.detach().abs().amax().float()
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)

    def compute_amax(self):
        return self.amax


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"FP8 matrix products need a CUDA GPU; the model is on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) < (8, 9):
        return False, f"{name} (compute capability {major}.{minor}) has no FP8 tensor cores; FP8 needs 8.9+ (Ada, Hopper)"
    return True, name


def quantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_linear(x, w, bias=None):
    """F.linear, or an FP8 product when `w` is an Fp8Matrix."""
    if not isinstance(w, tuple):
        return F.linear(x, w, bias)
    w8, w_scale, x_scale = w
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    pad = (-m) % 16  # _scaled_mm wants every dimension a multiple of 16
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    out = torch._scaled_mm(quantize(x2, x_scale), w8.t(), scale_a=x_scale, scale_b=w_scale,
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out[:m].reshape(*shape[:-1], -1)


def fp8_linear_emulated(x, w, bias=None):
    """The same arithmetic with dequantized operands (for checking on a CPU)."""
    if not isinstance(w, tuple):
        return F.linear(x, w, bias)
    w8, w_scale, x_scale = w
    xq = quantize(x, x_scale).float() * x_scale
    out = F.linear(xq, w8.float() * w_scale, None if bias is None else bias.float())
    return out.to(x.dtype)


def calibration_prompt_ids(cfg, tokenizer=None) -> list[int] | None:
    """The shipped instruction (calibration/prompt.txt) as PaliGemma token ids, or None when no
    tokenizer file is found (`tokenizer`: a path or a PaligemmaTokenizer; default openpi's cache path)."""
    from policy.pi05.tokenizer import PaligemmaTokenizer, default_tokenizer_path

    if not isinstance(tokenizer, PaligemmaTokenizer):
        path = tokenizer if tokenizer is not None else default_tokenizer_path()
        if not Path(path).expanduser().is_file():
            return None
        tokenizer = PaligemmaTokenizer(path, max_len=cfg.max_token_len)
    return tokenizer.ids((CALIBRATION_DIR / "prompt.txt").read_text())


def default_calibration(model: Pi05Model, tokenizer=None, prompt_tokens: int = 24, seed: int = 0):
    """The shipped LIBERO frame pair and instruction (random ids of a LIBERO-like length when no
    tokenizer is found), as one calibration batch."""
    from PIL import Image

    cfg, dev = model.config, model.llm.embed_tokens.weight.device
    frames = []
    for name in ("agentview.png", "wrist.png"):
        img = np.asarray(Image.open(CALIBRATION_DIR / name).convert("RGB").resize((cfg.image_size, cfg.image_size)))
        frames.append(torch.from_numpy(img.transpose(2, 0, 1).copy()).float() / 255 * 2 - 1)  # (3, H, W)
    ids = calibration_prompt_ids(cfg, tokenizer)
    if ids is None:
        log.info("fp8: no PaliGemma tokenizer found; calibrating with random prompt ids of %d tokens", prompt_tokens)
    inputs = example_inputs(cfg, 1, prompt_tokens, dev, seed, images=frames, prompt_ids=ids)
    return [tuple(inputs[:4])]


def calibrate(model: Pi05Model, num_steps: int, batches) -> dict:
    """amax of the input of every FP8 matrix, keyed (kind, layer, name), from the bf16 computation."""
    probes: dict[int, _Max] = {}

    def recording_linear(x, w, bias=None):
        probes.setdefault(w.data_ptr(), _Max()).collect(x)
        return F.linear(x, w, bias)

    ref = CompiledSampler(model, num_steps=num_steps, torch_compile=False, cuda_graphs=False, linear=recording_linear)
    for images, masks, tokens, token_masks in batches:
        noise = torch.randn(tokens.shape[0], model.config.chunk_size, model.config.action_dim, device=tokens.device)
        ref(images, masks, tokens, token_masks, noise)
    amax = {}
    for kind, names in FP8_MATRICES.items():
        for i, ws in enumerate(ref.weights[kind]):
            for name in names:
                probe = probes.get(getattr(ws, name).data_ptr())
                if probe is None:  # never used (the last prefix layer only makes K/V): stays as it is
                    continue
                amax[(kind, i, name)] = probe.compute_amax().float().reshape(())
    return amax


class Fp8Sampler(CompiledSampler):
    """`compile` with FP8 matrix products (see the module docstring)."""

    name = "fp8"

    def __init__(self, model: Pi05Model, num_steps: int = 10, calibration=None, emulate: bool = False,
                 tokenizer=None, **options):
        device = model.llm.embed_tokens.weight.device
        if not emulate:
            ok, why = fp8_supported(device)
            if not ok:
                raise RuntimeError(f"backend 'fp8' cannot run here: {why}. Use backend=compile (bf16) instead.")
        batches = calibration if calibration is not None else default_calibration(model, tokenizer)
        self.amax = calibrate(model, num_steps, batches)
        log.info("fp8: calibrated %d activation scales (running max of |x|)", len(self.amax))
        if emulate:
            options.setdefault("torch_compile", False)
            options.setdefault("cuda_graphs", False)
        super().__init__(model, num_steps=num_steps, linear=fp8_linear_emulated if emulate else fp8_linear, **options)

    def prepare_weights(self, weights: dict[str, list]) -> dict[str, list]:
        out = {kind: list(layers) for kind, layers in weights.items()}
        for (kind, i, name), amax in self.amax.items():
            w = getattr(out[kind][i], name)
            w_scale = (w.detach().abs().amax().float() / E4M3_MAX).clamp(min=1e-12).reshape(())
            x_scale = (amax.to(w.device) / E4M3_MAX).clamp(min=1e-12).reshape(())
            out[kind][i] = out[kind][i]._replace(**{name: Fp8Matrix(quantize(w, w_scale).contiguous(), w_scale, x_scale)})
        return out


__all__ = ["FP8_MATRICES", "Fp8Matrix", "Fp8Sampler", "calibrate", "default_calibration", "fp8_linear"]
