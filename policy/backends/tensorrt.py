"""The `tensorrt` backend: Torch-TensorRT engines for the vision and prefix stages (FP16, BF16 or
FP8 through nvidia-modelopt), with the `compile` backend's CUDA-graph denoise loop.

Optional: `pip install -e ".[tensorrt]"` (torch-tensorrt and the TensorRT libraries; `[fp8]` too for
precision="fp8"). Written against Torch-TensorRT's documented dynamo API
(`torch_tensorrt.compile(module, ir="dynamo", inputs=..., enabled_precisions=...)`) and ModelOpt's
PTQ flow (`mtq.quantize(module, mtq.FP8_DEFAULT_CFG, forward_loop)` then compile under
`export_torch_mode()`). TensorRT could not be installed where this project is developed, so only
the stage modules (checked against eager on the CPU) and the missing-package error are tested.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from policy.backends.compiled import CompiledSampler
from policy.pi05.gemma import rope_cos_sin
from policy.pi05.model import Pi05Model

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


class VisionStage(nn.Module):
    """pixels (N, 3, 224, 224) fp32 in [-1, 1] -> image tokens (N, 256, width)."""

    def __init__(self, model: Pi05Model):
        super().__init__()
        self.vision, self.projector = model.vision, model.projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(pixels))


class PrefixStage(nn.Module):
    """Prefix embeddings (B, L, width), validity (B, L) -> K and V of every layer, (depth, B, L, hd)."""

    def __init__(self, model: Pi05Model):
        super().__init__()
        self.model = model

    def forward(self, embs: torch.Tensor, valid: torch.Tensor):
        cfg, layers = self.model.config, self.model.llm.layers
        positions = torch.cumsum(valid.to(torch.int64), dim=1) - 1
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, embs.dtype)
        x, ks, vs = embs, [], []
        for i, layer in enumerate(layers):  # no data-dependent branches: exportable
            x, k, v = layer(x, cos, sin, valid, need_output=i < len(layers) - 1)
            ks.append(k[:, 0])
            vs.append(v[:, 0])
        return torch.stack(ks), torch.stack(vs)


def _import_torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise ImportError(
            "backend 'tensorrt' needs Torch-TensorRT and the TensorRT libraries, which are not installed: "
            "pip install -e '.[tensorrt]' (on a machine with NVIDIA's TensorRT), or use backend=compile."
        ) from exc
    return torch_tensorrt


class TensorRTSampler(CompiledSampler):
    """Vision and prefix through TensorRT engines built per shape; the rest as `compile`."""

    name = "tensorrt"
    supports_rtc = False  # not tested where TensorRT cannot be installed

    def __init__(self, model: Pi05Model, num_steps: int = 10, precision: str = "fp16", **options):
        self.trt = _import_torch_tensorrt()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        super().__init__(model, num_steps=num_steps, **options)
        self._engines: dict[tuple, tuple] = {}

    def _build(self, module: nn.Module, example: tuple):
        if self.precision == "fp8":
            import modelopt.torch.quantization as mtq
            from modelopt.torch.quantization.utils import export_torch_mode

            # ModelOpt inserts quantizers in place: quantize a copy, never the model the other stages share
            module = copy.deepcopy(module)
            mtq.quantize(module, mtq.FP8_DEFAULT_CFG, forward_loop=lambda m: m(*example))
            with export_torch_mode():
                return self.trt.compile(module, ir="dynamo", inputs=list(example),
                                        enabled_precisions={torch.float8_e4m3fn, torch.bfloat16})
        return self.trt.compile(module, ir="dynamo", inputs=list(example),
                                enabled_precisions={PRECISIONS[self.precision]})

    def _engines_for(self, shape, st):
        if shape.key not in self._engines:
            n = st.pixels.shape[0]
            vision = self._build(VisionStage(self.model), (st.pixels[:n],)) if n else None
            embs = torch.zeros(shape.batch, st.prefix_len, self.cfg.width, dtype=self.dtype, device=self.device)
            valid = torch.ones(shape.batch, st.prefix_len, dtype=torch.bool, device=self.device)
            prefix = self._build(PrefixStage(self.model), (embs, valid))
            self._engines[shape.key] = (vision, prefix)
        return self._engines[shape.key]

    def _vision(self, shape, st) -> None:
        vision, _ = self._engines_for(shape, st)
        if vision is not None:
            tokens = vision(st.pixels)
            st.image_tokens.copy_(torch.cat(tokens.split(shape.batch, dim=0), dim=1))

    def _prefix(self, shape, st) -> None:
        _, prefix = self._engines_for(shape, st)
        embs = torch.cat([st.image_tokens, self.model.llm.embed(st.tokens).to(self.dtype)], dim=1)
        valid = self._valid(st)
        ks, vs = prefix(embs, valid)
        length = st.prefix_len
        for i in range(self.cfg.depth):
            st.k[i][:, :length].copy_(ks[i])
            st.v[i][:, :length].copy_(vs[i])
        self._finish_prefix(st, valid)
