"""What the compiled backends precompute from a loaded model: fused, norm-folded weight matrices
(by name, one NamedTuple per layer kind) and the time conditioning of a fixed step schedule.

All exact in real arithmetic (computed in fp32, stored in the model dtype):
* q|k|v in one matrix per attention, gate|up in one per Gemma MLP (openpi: gemma.py keeps them as
  one einsum too: `qkv_einsum`, `gating_einsum`);
* SigLIP LayerNorm affines folded into the next matrix (W' = W diag(g), c' = c + W b) and Gemma
  RMSNorm `(1 + w)` likewise (W' = W diag(1 + w)); the expert's adaRMS norms have no weight to fold;
* the time MLP and every adaRMS modulation (18 x 2 + 1 Dense layers) depend only on t, so for the
  fixed Euler schedule they are computed once (openpi computes them in every denoise step).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from policy.pi05.model import Pi05Model


class VisionWeights(NamedTuple):
    """One SigLIP layer: LayerNorm 1 folded into qkv, LayerNorm 2 into fc1."""

    qkv_w: torch.Tensor  # (3 * D, D)
    qkv_b: torch.Tensor  # (3 * D,)
    o_w: torch.Tensor  # (D, D)
    o_b: torch.Tensor
    fc1_w: torch.Tensor  # (mlp, D)
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor  # (D, mlp)
    fc2_b: torch.Tensor


class PrefixWeights(NamedTuple):
    """One Gemma 2B layer, no biases: (1 + w) of the input norm folded into qkv, of the post-attention
    norm into gate|up."""

    qkv: torch.Tensor  # ((H + 2) * hd, width): q heads, then the one k head, then the one v head
    o: torch.Tensor  # (width, H * hd)
    gate_up: torch.Tensor  # (2 * mlp, width): gate rows first
    down: torch.Tensor  # (width, mlp)


class ExpertWeights(NamedTuple):
    """One action-expert layer (adaRMS norms: nothing folded)."""

    qkv: torch.Tensor  # ((H + 2) * hd, w)
    o: torch.Tensor  # (w, H * hd)
    gate_up: torch.Tensor  # (2 * mlp, w)
    down: torch.Tensor  # (w, mlp)


LAYER_KINDS = {"vision": VisionWeights, "prefix": PrefixWeights, "expert": ExpertWeights}


def fused_weights(model: Pi05Model) -> dict[str, list]:
    """Per layer kind ("vision", "prefix", "expert"), a list with one NamedTuple per layer."""
    dt = model.dtype
    out = {"vision": [], "prefix": [], "expert": []}
    with torch.no_grad():
        for layer in model.vision.encoder.layers:
            a, ln1, ln2 = layer.self_attn, layer.layer_norm1, layer.layer_norm2
            w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).float()
            bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).float()
            fc1 = layer.mlp.fc1
            out["vision"].append(VisionWeights(
                qkv_w=(w * ln1.weight.float()).to(dt), qkv_b=(bias + w @ ln1.bias.float()).to(dt),
                o_w=a.out_proj.weight, o_b=a.out_proj.bias,
                fc1_w=(fc1.weight.float() * ln2.weight.float()).to(dt),
                fc1_b=(fc1.bias.float() + fc1.weight.float() @ ln2.bias.float()).to(dt),
                fc2_w=layer.mlp.fc2.weight, fc2_b=layer.mlp.fc2.bias))
        for layer in model.llm.layers:
            a = layer.self_attn
            g1 = 1.0 + layer.input_layernorm.weight.float()
            g2 = 1.0 + layer.post_attention_layernorm.weight.float()
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).float() * g1
            gu = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).float() * g2
            out["prefix"].append(PrefixWeights(qkv=qkv.to(dt), o=a.o_proj.weight, gate_up=gu.to(dt),
                                               down=layer.mlp.down_proj.weight))
        for layer in model.expert.layers:
            a = layer.self_attn
            out["expert"].append(ExpertWeights(
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), o=a.o_proj.weight,
                gate_up=torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                down=layer.mlp.down_proj.weight))
    return out


def precompute_modulations(model: Pi05Model, times: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """adaRMS [scale, shift, gate] of every expert norm at every step: (steps, depth, 6, w), and the
    final norm's [scale, shift]: (steps, 2, w). fp32, as openpi computes the modulation."""
    dev = model.time_mlp_in.weight.device
    layers, final = [], []
    with torch.no_grad():
        for t in times:
            cond = model.time_conditioning(torch.tensor([t], dtype=torch.float32, device=dev))
            per_layer = []
            for layer in model.expert.layers:
                mods = layer.input_layernorm.modulation(cond) + layer.post_attention_layernorm.modulation(cond)
                per_layer.append(torch.cat([m.reshape(1, -1) for m in mods]).float())
            layers.append(torch.stack(per_layer))
            scale, shift, _ = model.expert.norm.modulation(cond)
            final.append(torch.cat([scale.reshape(1, -1), shift.reshape(1, -1)]).float())
    return torch.stack(layers), torch.stack(final)
