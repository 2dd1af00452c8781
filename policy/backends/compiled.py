"""The `compile` backend: fused weights, regional torch.compile, and CUDA graphs (one per call).

What it does to the eager model's computation (all exact in real arithmetic; bf16 rounding moves):
* fused projections (q|k|v, gate|up), norm affines folded into the next matrix, and the time
  conditioning precomputed for the fixed step schedule (policy/backends/fused.py);
* static buffers: the prefix K/V cache and the action tokens' own K/V share one buffer per layer
  (no concatenation), positions and masks are computed once per observation;
* one torch.compile'd function per layer kind (SigLIP, Gemma prefix, expert), reused by every layer
  (small compile, cached on disk by inductor for the next process), and on CUDA one graph for the whole
  sample, replayed per call (and one per stage: vision, prefix, whole denoise loop, for `encode` /
  `denoise` and the benchmark's stage times).

Shapes are static per (batch size, camera slots present, prompt bucket): the prompt is padded to the
next of PROMPT_BUCKETS tokens and padding is masked, so any prompt reuses a captured graph. The shape
is read from the masks on the host: masks passed as host tensors (or numpy arrays, as the policy has
them before upload) make a call one copy of the inputs plus one graph replay, with no device sync before
the actions come back; masks on the device are copied to the host first (a sync).

`expert_kernels="triton"` runs the expert layers of the denoise loop through fused Triton kernels
(policy/backends/expert_triton.py) instead of the inductor-compiled layer for calls of one observation
(`expert_kernel_rows`); "inductor" is the default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from policy.backends.fused import fused_weights, precompute_modulations
from policy.backends.rtc import Guide, guided_velocity
from policy.pi05.gemma import apply_rope as _rope
from policy.pi05.gemma import rms as _rms
from policy.pi05.gemma import rope_cos_sin
from policy.pi05.model import Pi05Model, as_slots, euler_times

PROMPT_BUCKETS = (32, 64, 128, 200)
STAGES = ("vision", "prefix", "denoise")
KEY_ALIGN = 64  # key count of the denoise attention, rounded up: unaligned GEMMs get slow kernels
EXPERT_KERNELS = ("inductor", "triton")


def host_bool(mask) -> np.ndarray:
    """A mask as a numpy bool array (a device tensor is copied to the host: that syncs)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().to("cpu")
    return np.asarray(mask, dtype=bool)


def split_qkv(qkv, cos, sin, heads: int, hd: int):
    """qkv (B, T, (H + 2) hd) -> q as rows (B, T * H, hd) (row t * H + h), k and v (B, T, hd); RoPE on q and k
    with cos/sin (B, T, hd). All heads share the single K/V head, so the heads need no axis of their own."""
    b, t, _ = qkv.shape
    q = _rope(qkv[..., : heads * hd].view(b, t, heads, hd), cos[:, :, None], sin[:, :, None])
    k = _rope(qkv[..., heads * hd: (heads + 1) * hd], cos, sin)
    return q.reshape(b, t * heads, hd), k, qkv[..., (heads + 1) * hd:]


def mqa_attention(q, k, v, bias):
    """Attention of query rows q (B, T * H, hd) over ONE shared K/V head k, v (B, S, hd): two plain
    matmuls and a softmax, no per-head kernels or transposes. `bias` (B, 1, S) fp32 is 0 for valid
    keys and a large negative for padding. Numerics as openpi's eager attention: bf16 scores, scaled,
    masked and softmaxed in fp32, probabilities back to bf16. Returns (B, T, H * hd)."""
    b, rows, hd = q.shape
    if b == 1:  # a plain matrix product gets better GEMM kernels than a batch of one
        scores = (q[0] @ k[0].T)[None]
    else:
        scores = q @ k.transpose(1, 2)
    probs = torch.softmax(scores.float() * hd ** -0.5 + bias, dim=-1).to(v.dtype)
    return (probs[0] @ v[0])[None] if b == 1 else probs @ v


def sdpa_attention(q, k, v, bias, heads: int):
    """The same through torch's scaled_dot_product_attention (kernel chosen by torch)."""
    b, rows, hd = q.shape
    t = rows // heads
    qh = q.view(b, t, heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, k[:, None].expand(b, heads, k.shape[1], hd),
                                         v[:, None].expand(b, heads, v.shape[1], hd),
                                         attn_mask=bias[:, None].to(q.dtype), scale=hd ** -0.5)
    return out.transpose(1, 2).reshape(b, t, heads * hd)


MASKED = -2.3819763e38  # openpi's big_neg (finite: -inf would turn padded rows into NaN)


def attention(q, k, v, bias, heads: int, impl: str):
    if impl == "sdpa":
        return sdpa_attention(q, k, v, bias, heads)
    b, rows, hd = q.shape
    return mqa_attention(q, k, v, bias).reshape(b, rows // heads, heads * hd)


attention_fn = attention  # CompiledSampler's `attention` argument (a name) hides the function there


# ----- the layer functions that get compiled (weights are arguments: one compile serves all layers) -----

def siglip_layer(x, qkv_w, qkv_b, o_w, o_b, fc1_w, fc1_b, fc2_w, fc2_b, *, heads: int, eps: float, linear=F.linear):
    b, t, d = x.shape
    h = F.layer_norm(x, (d,), eps=eps)  # affine folded into qkv
    qkv = linear(h, qkv_w, qkv_b).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    x = x + linear(out.transpose(1, 2).reshape(b, t, d), o_w, o_b)
    h = F.layer_norm(x, (d,), eps=eps)  # affine folded into fc1
    return x + linear(F.gelu(linear(h, fc1_w, fc1_b), approximate="tanh"), fc2_w, fc2_b)


def prefix_layer(x, cos, sin, bias, k_buf, v_buf, qkv_w, o_w, gu_w, down_w, *, heads: int, hd: int, eps: float,
                 kv_only: bool, linear=F.linear, impl: str = "matmul"):
    """One Gemma 2B layer over the prefix; writes its post-RoPE K and V into k_buf/v_buf[:, :T]."""
    t = x.shape[1]
    q, k, v = split_qkv(linear(_rms(x, eps).to(x.dtype), qkv_w, None), cos, sin, heads, hd)  # (1 + w) folded
    k_buf[:, :t].copy_(k)
    v_buf[:, :t].copy_(v)
    if kv_only:  # the last layer: only its K/V are ever read
        return x
    x = x + linear(attention(q, k, v, bias, heads, impl), o_w, None)
    gate, up = linear(_rms(x, eps).to(x.dtype), gu_w, None).chunk(2, dim=-1)
    return x + linear(F.gelu(gate, approximate="tanh") * up, down_w, None)


def expert_layer(x, mods, cos, sin, bias, k_buf, v_buf, qkv_w, o_w, gu_w, down_w, *, heads: int, hd: int,
                 eps: float, prefix_len: int, linear=F.linear, impl: str = "matmul", functional: bool = False):
    """One action-expert layer; `mods` (6, w) holds this step's [scale, shift, gate] x 2 (fp32). The
    action tokens' K/V go into k_buf/v_buf[:, prefix_len:prefix_len + T], after the cached prefix.
    `functional=True` writes nothing and attends [cached prefix ; own K/V] by concatenation instead,
    so autograd can differentiate the step (real-time chunking's guidance, policy/backends/rtc.py)."""
    h = (_rms(x, eps) * (1.0 + mods[0]) + mods[1]).to(x.dtype)
    q, k, v = split_qkv(linear(h, qkv_w, None), cos, sin, heads, hd)
    t = x.shape[1]
    if functional:
        keys, values = torch.cat([k_buf[:, :prefix_len], k], dim=1), torch.cat([v_buf[:, :prefix_len], v], dim=1)
        bias = bias[:, :, :prefix_len + t]
    else:
        k_buf[:, prefix_len:prefix_len + t].copy_(k)
        v_buf[:, prefix_len:prefix_len + t].copy_(v)
        keys, values = k_buf, v_buf
    x = x + linear(attention(q, keys, values, bias, heads, impl), o_w, None) * mods[2].to(x.dtype)
    h = (_rms(x, eps) * (1.0 + mods[3]) + mods[4]).to(x.dtype)
    gate, up = linear(h, gu_w, None).chunk(2, dim=-1)
    return x + linear(F.gelu(gate, approximate="tanh") * up, down_w, None) * mods[5].to(x.dtype)


def differentiable_linear(x, w, bias=None):
    """F.linear; an FP8 matrix (w8, w_scale, x_scale) is dequantized to the activations' dtype, since
    torch._scaled_mm has no backward and real-time chunking differentiates through the expert."""
    if isinstance(w, tuple):
        w8, w_scale, _ = w
        w = (w8.to(torch.float32) * w_scale).to(x.dtype)
    return F.linear(x, w, bias)


def expert_stack(x, mods, cos, sin, bias, ks, vs, weights, **kw):
    """All expert layers of one denoise step (compiled as one graph with `whole_step=True`, so
    inductor can also fuse across layer boundaries)."""
    for i, w in enumerate(weights):
        x = expert_layer(x, mods[i], cos, sin, bias, ks[i], vs[i], *w, **kw)
    return x


def suffix_out(x, mods, w, b, *, eps: float):
    """Final adaRMS (gate discarded) and the fp32 velocity head."""
    h = _rms(x, eps) * (1.0 + mods[0]) + mods[1]
    return F.linear(h.to(w.dtype), w, b).float()


# ----- per-shape state ----------------------------------------------------------------------------------

@dataclass
class _Shape:
    batch: int
    slots: tuple[int, ...]  # camera slots encoded (present for at least one row)
    prompt: int  # prompt bucket

    @property
    def key(self):
        return (self.batch, self.slots, self.prompt)


@dataclass
class _State:
    """Static buffers for one shape: inputs, the KV cache, and outputs."""

    pixels: torch.Tensor  # (S * B, 3, H, W)
    slot_mask: torch.Tensor  # (S, B) bool
    tokens: torch.Tensor  # (B, P)
    token_mask: torch.Tensor  # (B, P)
    noise: torch.Tensor  # (B, chunk, action_dim) fp32
    image_tokens: torch.Tensor  # (B, S * 256, width)
    prefix_len: int  # L: image tokens + prompt bucket
    k: list[torch.Tensor]  # per layer (B, S, hd): the prefix (L), the action tokens (chunk), masked padding
    v: list[torch.Tensor]
    bias: torch.Tensor  # (B, 1, S) fp32: 0 for valid keys, MASKED for padding
    cos: torch.Tensor  # the action tokens' RoPE (B, chunk, hd)
    sin: torch.Tensor
    actions: torch.Tensor  # (B, chunk, action_dim) fp32
    graphs: dict = field(default_factory=dict)


def _on_device(method):
    """Run a method with the sampler's GPU as the current CUDA device: streams, graph capture and
    replay, and Triton launches all use the current device, which in a multi-GPU sweep is not
    necessarily the model's (job k of a joblib sweep runs on cuda:(k mod n))."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.device.type != "cuda":
            return method(self, *args, **kwargs)
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)

    return wrapper


class CompiledSampler:
    """Pi0.5 sampling through fused, compiled layers; CUDA graphs on GPU (see the module docstring)."""

    name = "compile"
    supports_rtc = True  # through the differentiable expert path, without graph capture

    def __init__(self, model: Pi05Model, num_steps: int = 10, torch_compile: bool = True, cuda_graphs: bool | None = None,
                 compile_mode: str | None = None, expert_compile_mode: str | None = None, attention: str = "matmul",
                 whole_step: bool = True, expert_kernels: str = "inductor", expert_attention: str = "compiled",
                 expert_kernel_rows: int | None = None, expert_persistent: bool = False, linear=None):
        """torch_compile: compile the layer functions with inductor (False: run them eagerly, e.g. to check
        the fused structure); cuda_graphs: capture each stage (default: on CUDA); compile_mode /
        expert_compile_mode: torch.compile modes; attention: "matmul" or "sdpa"; whole_step: compile a
        denoise step's expert layers as one graph; expert_kernels: "inductor" or "triton" (the fused
        expert kernels); expert_attention (with expert_kernels="triton"): "compiled" (the attention
        function above, compiled) or "triton" (the split-key attention kernel); expert_kernel_rows: the fused
        kernels run calls of at most this many action rows (batch x chunk; default: one observation's
        chunk), larger calls the inductor layer, which is faster there (H200, batch 16: README's
        Performance section); expert_persistent (with expert_kernels="triton"): one observation's step runs
        as one persistent kernel (policy/backends/expert_step.py) rather than five kernels a layer (with its
        own attention, the split-key kernel's tiles, whatever expert_attention says; slower, see README);
        linear: the matrix product (the fp8 backend passes its own)."""
        self.model = model
        self.cfg = cfg = model.config
        self.device = model.llm.embed_tokens.weight.device
        self.dtype = model.dtype
        self.num_steps = int(num_steps)
        self.times, self.dt = euler_times(self.num_steps)
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.weights = self.prepare_weights(fused_weights(model))
        self.mods, self.final_mods = precompute_modulations(model, self.times)
        self._linear = linear or F.linear
        if attention not in ("matmul", "sdpa"):
            raise ValueError(f"unknown attention {attention!r}; choose matmul or sdpa")
        if expert_kernels not in EXPERT_KERNELS:
            raise ValueError(f"unknown expert_kernels {expert_kernels!r}; choose {' or '.join(EXPERT_KERNELS)}")
        if expert_attention not in ("compiled", "triton"):
            raise ValueError(f"unknown expert_attention {expert_attention!r}; choose compiled or triton")
        if expert_attention == "triton" and expert_kernels != "triton":
            raise ValueError("expert_attention='triton' runs inside the fused expert layer: add expert_kernels='triton'")
        if expert_persistent and expert_kernels != "triton":
            raise ValueError("expert_persistent=True is the fused expert kernels' step kernel: add expert_kernels='triton'")
        self._impl = attention
        hd, heads, eps = cfg.head_dim, cfg.num_heads, cfg.norm_eps
        fns = {
            "vision": functools.partial(siglip_layer, heads=cfg.vision_heads, eps=cfg.norm_eps, linear=self._linear),
            "prefix": functools.partial(prefix_layer, heads=heads, hd=hd, eps=eps, kv_only=False, linear=self._linear,
                                        impl=self._impl),
            "prefix_kv": functools.partial(prefix_layer, heads=heads, hd=hd, eps=eps, kv_only=True, linear=self._linear,
                                           impl=self._impl),
            "out": functools.partial(suffix_out, eps=eps),
        }
        if expert_kernels == "triton" and expert_attention == "compiled":
            fns["attention"] = functools.partial(attention_fn, heads=heads, impl=self._impl)  # between the kernels
        if torch_compile:
            fns = {k: torch.compile(f, fullgraph=True, dynamic=False, mode=compile_mode) for k, f in fns.items()}
        self._fn = fns
        self._expert = {}  # prefix length -> compiled expert layer (prefix_len is baked in)
        self.expert_kernels = expert_kernels
        self.expert_kernel_rows = cfg.chunk_size if expert_kernel_rows is None else int(expert_kernel_rows)
        if self.expert_kernel_rows < 1:
            raise ValueError(f"expert_kernel_rows must be a positive number of rows, got {expert_kernel_rows!r}")
        self._kernels = self._expert_kernels(fns.get("attention"), bool(expert_persistent)) \
            if expert_kernels == "triton" else None
        self._compile, self._compile_mode = torch_compile, compile_mode
        self._expert_mode = expert_compile_mode or compile_mode
        self._whole_step = bool(whole_step)
        self._states: dict[tuple, _State] = {}
        if self.cuda_graphs:
            with torch.cuda.device(self.device):
                self._pool = torch.cuda.graph_pool_handle()
        else:
            self._pool = None

    def prepare_weights(self, weights: dict[str, list]) -> dict[str, list]:
        """Hook for subclasses (FP8 swaps matrices here)."""
        return weights

    def _expert_kernels(self, attention, persistent: bool):
        from policy.backends import expert_step, expert_triton  # import triton: only for this option

        hd = self.cfg.head_dim
        if self.device.type != "cuda" and not expert_triton.INTERPRET:
            raise ValueError("expert_kernels='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
        if self.device.type == "cuda" and (hd // 2) % expert_triton.WIDEST_N:
            raise ValueError(f"expert_kernels='triton' needs head_dim / 2 to be a multiple of {expert_triton.WIDEST_N}, "
                             f"got head_dim {hd}")
        if persistent:  # the step kernel takes each kind's matrices as one (depth, N, K) tensor
            self.weights["expert"] = expert_step.stack_layers(self.weights["expert"])
            return expert_step.StepKernels(self.cfg.num_heads, self.cfg.norm_eps, attention)
        return expert_triton.ExpertKernels(self.cfg.num_heads, self.cfg.norm_eps, attention)

    @property
    def kernel_status(self) -> dict[str, str]:
        """Per fused expert kernel (expert_kernels="triton"), "ok: ..." or "fallback: ..." once it has run."""
        return dict(self._kernels.status) if self._kernels is not None else {}

    def _expert_fn(self, prefix_len: int, functional: bool = False):
        key = (prefix_len, functional)
        if key not in self._expert:
            cfg = self.cfg
            whole = self._whole_step or functional
            f = functools.partial(expert_stack if whole else expert_layer, heads=cfg.num_heads,
                                  hd=cfg.head_dim, eps=cfg.norm_eps, prefix_len=prefix_len,
                                  linear=differentiable_linear if functional else self._linear, impl=self._impl,
                                  functional=functional)
            self._expert[key] = torch.compile(f, fullgraph=True, dynamic=False, mode=self._expert_mode) \
                if self._compile else f
        return self._expert[key]

    # ----- shapes and buffers ---------------------------------------------------------------------------
    def bucket(self, prompt_tokens: int) -> int:
        """The prompt bucket holding `prompt_tokens` tokens."""
        cap = self.cfg.max_token_len
        return min(next((b for b in PROMPT_BUCKETS if prompt_tokens <= b <= cap), cap), cap)

    def shape_for(self, image_masks, token_masks) -> _Shape:
        """The static shape of these inputs, read from the masks on the host: free for host masks
        (numpy or CPU tensors); device masks are copied to the host (a device sync)."""
        slots = tuple(i for i, m in enumerate(image_masks) if host_bool(m).any())
        token_masks = host_bool(token_masks)
        return _Shape(int(token_masks.shape[0]), slots, self.bucket(int(token_masks.sum(1).max())))

    def _state(self, shape: _Shape) -> _State:
        if shape.key in self._states:
            return self._states[shape.key]
        cfg, dev, b = self.cfg, self.device, shape.batch
        s = len(shape.slots)
        n_img = s * cfg.num_patches
        length = n_img + shape.prompt
        h = cfg.chunk_size
        keys = -(-(length + h) // KEY_ALIGN) * KEY_ALIGN
        # one (depth, B, S, hd) tensor per cache, a view per layer (the persistent step kernel takes them whole)
        kv = lambda: list(torch.zeros(cfg.depth, b, keys, cfg.head_dim, dtype=self.dtype, device=dev).unbind(0))  # noqa: E731
        bias = torch.full((b, 1, keys), MASKED, device=dev)
        bias[:, :, length:length + h] = 0.0  # the action tokens always see each other
        st = _State(
            pixels=torch.zeros(s * b, 3, cfg.image_size, cfg.image_size, device=dev),
            slot_mask=torch.zeros(s, b, dtype=torch.bool, device=dev),
            tokens=torch.zeros(b, shape.prompt, dtype=torch.long, device=dev),
            token_mask=torch.zeros(b, shape.prompt, dtype=torch.bool, device=dev),
            noise=torch.zeros(b, h, cfg.action_dim, device=dev),
            image_tokens=torch.zeros(b, n_img, cfg.width, dtype=self.dtype, device=dev),
            prefix_len=length, k=kv(), v=kv(),
            bias=bias,
            cos=torch.zeros(b, h, cfg.head_dim, dtype=self.dtype, device=dev),
            sin=torch.zeros(b, h, cfg.head_dim, dtype=self.dtype, device=dev),
            actions=torch.zeros(b, h, cfg.action_dim, device=dev),
        )
        self._states[shape.key] = st
        if self.cuda_graphs:
            self._capture(shape, st)
        return st

    # ----- the three stages (pure GPU work on static buffers: capturable) --------------------------------
    def _vision(self, shape: _Shape, st: _State) -> None:
        if not shape.slots:
            return
        m = self.model
        x = m.vision.embeddings(st.pixels, self.dtype)
        for w in self.weights["vision"]:
            x = self._fn["vision"](x, *w)
        x = m.projector(m.vision.post_layernorm(x))  # (S * B, 256, width)
        b = shape.batch
        st.image_tokens.copy_(torch.cat(x.split(b, dim=0), dim=1))

    def _valid(self, st: _State) -> torch.Tensor:
        """(B, L) bool: image tokens of present slots per row, then the prompt's real tokens."""
        return torch.cat([st.slot_mask.t().repeat_interleave(self.cfg.num_patches, dim=1), st.token_mask], dim=1)

    def _finish_prefix(self, st: _State, valid: torch.Tensor) -> None:
        """What the denoise loop needs from the prefix besides K/V: the key mask and the action tokens'
        RoPE (their positions start after the valid prefix tokens)."""
        cfg = self.cfg
        st.bias[:, 0, : valid.shape[1]].copy_(torch.where(valid, 0.0, MASKED))
        suffix_pos = valid.sum(dim=1, keepdim=True) + torch.arange(cfg.chunk_size, device=self.device)
        cos_s, sin_s = rope_cos_sin(suffix_pos, cfg.head_dim, cfg.rope_theta, self.dtype)
        st.cos.copy_(cos_s[:, 0])
        st.sin.copy_(sin_s[:, 0])

    def _prefix(self, shape: _Shape, st: _State) -> None:
        cfg, m = self.cfg, self.model
        x = torch.cat([st.image_tokens, m.llm.embed(st.tokens).to(self.dtype)], dim=1)
        valid = self._valid(st)
        self._finish_prefix(st, valid)
        positions = torch.cumsum(valid, dim=1) - 1  # openpi's positions: valid tokens count 0, 1, ...
        cos, sin = (c[:, 0] for c in rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype))
        bias = st.bias[:, :, : valid.shape[1]]
        last = cfg.depth - 1
        for i, w in enumerate(self.weights["prefix"]):
            fn = self._fn["prefix_kv" if i == last else "prefix"]
            x = fn(x, cos, sin, bias, st.k[i], st.v[i], *w)

    def _denoise(self, shape: _Shape, st: _State) -> None:
        m = self.model
        kernels = self._kernels if shape.batch * self.cfg.chunk_size <= self.expert_kernel_rows else None
        layer = self._expert_fn(st.prefix_len) if kernels is None else None
        x = st.noise.clone()
        for step in range(self.num_steps):
            h = m.action_in_proj(x).to(self.dtype)
            mods = self.mods[step]
            if kernels is not None:
                h = kernels.stack(h, mods, st.cos, st.sin, st.bias, st.k, st.v, self.weights["expert"], st.prefix_len)
            elif self._whole_step:
                h = layer(h, mods, st.cos, st.sin, st.bias, st.k, st.v, self.weights["expert"])
            else:
                for i, w in enumerate(self.weights["expert"]):
                    h = layer(h, mods[i], st.cos, st.sin, st.bias, st.k[i], st.v[i], *w)
            v = self._fn["out"](h, self.final_mods[step], m.action_out_proj.weight, m.action_out_proj.bias)
            x = x + self.dt * v
        st.actions.copy_(x)

    def _call(self, shape: _Shape, st: _State) -> None:
        """A whole sample: the three stages back to back (on CUDA captured as ONE graph, so a call is the copy
        of its inputs and one replay: no host work between the stages)."""
        for name in STAGES:
            getattr(self, "_" + name)(shape, st)

    def _guided_denoise(self, st: _State, guide: Guide) -> torch.Tensor:
        """Real-time chunking: the Euler loop with each velocity corrected by a vector-Jacobian product
        through the (compiled, differentiable) expert step; not graph-captured (autograd runs)."""
        m = self.model
        layer = self._expert_fn(st.prefix_len, functional=True)
        weights = self.weights["expert"]
        x = st.noise.clone()
        for step, t in enumerate(self.times):
            mods, final = self.mods[step], self.final_mods[step]

            def velocity(z, mods=mods, final=final):
                h = m.action_in_proj(z).to(self.dtype)
                h = layer(h, mods, st.cos, st.sin, st.bias, st.k, st.v, weights)
                return self._fn["out"](h, final, m.action_out_proj.weight, m.action_out_proj.bias)

            x = x + self.dt * guided_velocity(velocity, x, t, guide.target, guide.weights, guide.beta)
        return x

    @_on_device
    def _capture(self, shape: _Shape, st: _State) -> None:
        """Compile and warm up on a side stream, then capture each stage as a CUDA graph (for `encode`,
        `denoise` and the benchmark's stage times), and the whole sample as one more (for a call). The
        graphs share one memory pool: none reads what another allocated (inputs and results live in the
        state's static buffers), and they never run at once."""
        stages = [(name, getattr(self, "_" + name)) for name in STAGES]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch._dynamo.config.patch(recompile_limit=64):
            for _ in range(2):
                for _, fn in stages:
                    fn(shape, st)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        for name, fn in stages + [("call", self._call)]:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                fn(shape, st)
            st.graphs[name] = g

    # ----- public API -------------------------------------------------------------------------------------
    def _load_inputs(self, shape: _Shape, st: _State, images, image_masks, tokens, token_masks, noise) -> None:
        b = shape.batch
        for j, slot in enumerate(shape.slots):
            st.pixels[j * b:(j + 1) * b].copy_(images[slot], non_blocking=True)
            st.slot_mask[j].copy_(torch.as_tensor(image_masks[slot]), non_blocking=True)
        p = shape.prompt
        st.tokens.copy_(tokens[:, :p], non_blocking=True)
        st.token_mask.copy_(torch.as_tensor(token_masks)[:, :p], non_blocking=True)
        if noise is None:
            st.noise.zero_()
        else:
            st.noise.copy_(noise, non_blocking=True)

    @_on_device
    def _run(self, name: str, shape: _Shape, st: _State) -> None:
        if self.cuda_graphs:
            st.graphs[name].replay()
        else:
            self._run_kernels(name, shape, st)

    @_on_device
    @torch.no_grad()
    def _run_kernels(self, name: str, shape: _Shape, st: _State) -> None:
        """A stage's code itself, kernel by kernel (no graph replay)."""
        getattr(self, "_" + name)(shape, st)

    @_on_device
    @torch.no_grad()
    def prepare(self, batch_size: int, slots=(0, 1), prompt_tokens: int = 32) -> None:
        """Compile and capture ahead of the first call (e.g. at load time) for a batch size."""
        self._state(_Shape(int(batch_size), tuple(sorted(slots)), self.bucket(prompt_tokens)))

    def _prepare(self, images, image_masks, tokens, token_masks, noise) -> tuple[_Shape, _State]:
        """The state for these inputs' shape (captured on first use), with the inputs copied in."""
        images, image_masks = as_slots(images, "images"), as_slots(image_masks, "image_masks")
        shape = self.shape_for(image_masks, token_masks)
        st = self._state(shape)
        self._load_inputs(shape, st, images, image_masks, tokens, token_masks, noise)
        return shape, st

    @_on_device
    @torch.no_grad()
    def encode(self, images, image_masks, tokens, token_masks):
        """Vision + prefix into the static cache; returns the handle `denoise` takes."""
        shape, st = self._prepare(images, image_masks, tokens, token_masks, None)
        self._run("vision", shape, st)
        self._run("prefix", shape, st)
        return shape, st

    @_on_device
    @torch.no_grad()
    def denoise(self, handle, noise: torch.Tensor, guide: Guide | None = None) -> torch.Tensor:
        shape, st = handle
        st.noise.copy_(noise, non_blocking=True)
        if guide is not None and guide.active:
            return self._guided_denoise(st, guide)
        self._run("denoise", shape, st)
        return st.actions.clone()

    @_on_device
    def stages(self, images, image_masks, tokens, token_masks, noise, *, graphs: bool = True) -> dict:
        """Callables that each run one stage alone on prepared inputs (for the benchmark); with
        `graphs=False` the stage's kernels run one by one (no CUDA graph), e.g. for a profiler."""
        shape, st = self._prepare(images, image_masks, tokens, token_masks, noise)
        run = self._run if graphs else self._run_kernels
        for name in STAGES:
            run(name, shape, st)
        return {name: functools.partial(run, name, shape, st) for name in STAGES}

    @_on_device
    @torch.no_grad()
    def __call__(self, images, image_masks, tokens, token_masks, noise, guide: Guide | None = None) -> torch.Tensor:
        shape, st = self._prepare(images, image_masks, tokens, token_masks, noise)
        if guide is not None and guide.active:  # real-time chunking: vision and prefix as usual, then guided
            self._run("vision", shape, st)
            self._run("prefix", shape, st)
            return self._guided_denoise(st, guide)
        self._run("call", shape, st)
        return st.actions.clone()
