"""Gemma 2B (the prefix expert) and Gemma 300M (the action expert) as plain modules.

openpi: src/openpi/models/gemma.py; PyTorch twin: openpi's patched HF GemmaModel
(transformers_replace/models/gemma/modeling_gemma.py). Both experts: multi-query attention (8 query
heads, 1 KV head, head_dim 256), split-half RoPE with base 10000, GeGLU MLP with tanh-GELU,
RMSNorm `x * rsqrt(mean(x^2) + eps) * (1 + w)` in fp32. The action expert's norms are adaRMSNorm:
a Dense on the time conditioning gives [scale | shift | gate], `y = rms(x) * (1 + scale) + shift`,
and residuals are gated: `x + gate * sublayer(y)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from policy.pi05.config import Pi05Config


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm; the stored weight is zero-centred (used as 1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class AdaRMSNorm(nn.Module):
    """adaRMSNorm (pi05): `dense(cond)` -> [scale | shift | gate] (each `dim` wide, in that order)."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(cond_dim, 3 * dim)
        self.eps = eps

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, cond_dim) -> scale, shift, gate, each (B, 1, dim), in the Dense's dtype (fp32 as openpi)."""
        mod = self.dense(cond.to(self.dense.weight.dtype))[:, None, :]
        return mod.chunk(3, dim=-1)

    @staticmethod
    def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
        return (rms(x, eps) * (1.0 + scale.float()) + shift.float()).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T): fp32 angles (as HF computes
    them: position times inv_freq), cast to the compute dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, Tq, hd) over k, v (B, 1, Tk, hd) (multi-query); key_valid (B, Tk) bool or None.
    Returns (B, Tq, H * hd)."""
    b, h, tq, hd = q.shape
    k = k.expand(b, h, k.shape[2], hd)
    v = v.expand(b, h, v.shape[2], hd)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
    return out.transpose(1, 2).reshape(b, tq, h * hd)


class GemmaAttention(nn.Module):
    """The projections of one expert's attention; the attention itself is shared (see model.py)."""

    def __init__(self, width: int, cfg: Pi05Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, width, bias=False)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h (B, T, width) -> q (B, H, T, hd), k and v (B, 1, T, hd), RoPE applied to q and k."""
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class GemmaMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class PrefixLayer(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.norm_eps)
        self.self_attn = GemmaAttention(cfg.width, cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = GemmaMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x, cos, sin, key_valid, need_output: bool = True):
        """Returns (x after the layer or None, k, v). The last layer's output is never used for
        sampling (only its K/V are), so `need_output=False` skips its attention and MLP."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), cos, sin)
        if not need_output:
            return None, k, v
        x = x + self.self_attn.o_proj(attend(q, k, v, key_valid))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class GemmaLM(nn.Module):
    """Gemma 2B over the prefix. `embed_tokens` is tied to openpi's `paligemma.lm_head`."""

    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(PrefixLayer(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)  # in the checkpoint; its output is unused for actions
        self.embed_scale = math.sqrt(cfg.width)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # A Python float, as openpi's PyTorch model multiplies (JAX rounds sqrt(width) to bf16 first).
        return self.embed_tokens(tokens) * self.embed_scale


class ExpertLayer(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        w = cfg.expert_width
        self.input_layernorm = AdaRMSNorm(w, w, cfg.norm_eps)
        self.self_attn = GemmaAttention(w, cfg)
        self.post_attention_layernorm = AdaRMSNorm(w, w, cfg.norm_eps)
        self.mlp = GemmaMLP(w, cfg.expert_mlp_dim)
        self.eps = cfg.norm_eps

    def forward(self, x, cond, cos, sin, prefix_k, prefix_v, key_valid):
        """Action tokens x (B, H, w) attend over [cached prefix K/V ; their own K/V]."""
        scale, shift, gate = self.input_layernorm.modulation(cond)
        h = AdaRMSNorm.modulate(x, scale, shift, self.eps)
        q, k, v = self.self_attn.qkv(h, cos, sin)
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
        x = x + self.self_attn.o_proj(attend(q, k, v, key_valid)) * gate.to(x.dtype)
        scale, shift, gate = self.post_attention_layernorm.modulation(cond)
        h = AdaRMSNorm.modulate(x, scale, shift, self.eps)
        return x + self.mlp(h) * gate.to(x.dtype)


class GemmaExpert(nn.Module):
    """Gemma 300M over the action tokens, conditioned on the flow-matching time through adaRMSNorm."""

    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(cfg) for _ in range(cfg.depth))
        self.norm = AdaRMSNorm(cfg.expert_width, cfg.expert_width, cfg.norm_eps)  # its gate is discarded
