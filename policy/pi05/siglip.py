"""SigLIP So400m/14 vision tower (no pooling head) and PaliGemma's projector, as plain modules.

openpi: src/openpi/models/siglip.py; PyTorch twin: HF SiglipVisionModel as patched by openpi
(transformers_replace/models/siglip). Pre-LN ViT: patch conv (fp32) + learned position embedding
(fp32), then cast to the compute dtype; blocks `z += MHA(LN1(z)); z += MLP(LN2(z))` with LayerNorm
eps 1e-6 and tanh-GELU; a final LayerNorm. Image tokens are projected to the Gemma width and NOT
rescaled (openpi removed HF PaliGemma's division by sqrt(width)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policy.pi05.config import Pi05Config


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.vision_width, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.vision_width)

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(w.dtype))  # (B, D, 16, 16), in fp32 as openpi
        x = x.flatten(2).transpose(1, 2)  # (B, 256, D)
        x = x + self.position_embedding.weight.to(x.dtype)
        # contiguous: the transposed view's strides would otherwise follow the residual stream through
        # every layer (norms and adds reading across the grain; compiled layers specialise to them)
        return x.to(dtype).contiguous()


class SiglipAttention(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        d = cfg.vision_width
        self.heads = cfg.vision_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vision_width, cfg.vision_mlp_dim)
        self.fc2 = nn.Linear(cfg.vision_mlp_dim, cfg.vision_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.vision_width, eps=cfg.norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.vision_width, eps=cfg.norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.vision_depth))


class SiglipVision(nn.Module):
    """Images (B, 3, 224, 224) in [-1, 1] -> tokens (B, 256, vision_width)."""

    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.vision_width, eps=cfg.norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.post_layernorm.weight.dtype
        x = self.embeddings(pixels, dtype)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Projector(nn.Module):
    """PaliGemma's multi_modal_projector: vision width -> Gemma width, no rescaling."""

    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.linear = nn.Linear(cfg.vision_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
