"""Fused Triton kernels for the action expert's denoising step: the `expert_kernels="triton"` option of
the `compile` and `fp8` backends (policy/backends/compiled.py), with a pure-torch reference of each fusion.

Why: at batch 1 a step is 18 layers over 10 action tokens; cuBLAS runs the four weight products of a
layer (34.6 MB of bf16) at 10 rows in ~27 us where the H200's bandwidth allows ~8-12 us, and the
norm / RoPE / gate kernels between them add launches and gaps. Here a layer is four weight-streaming
kernels plus the attention (three inductor kernels, as in the inductor path):

  qkv_rope:       h = rms(x) * (1 + scale1) + shift1 (fp32 stats, each program recomputes its rows'
                  RMS: 10 x 1024 values from L2) -> h @ Wqkv^T -> RoPE on q and k -> q into a
                  (M, H * hd) buffer, k and v straight into the static KV cache after the prefix
  attention:      q over [prefix K/V ; own K/V]: the compiled matmul + softmax + matmul (default), or
                  with expert_attention="triton" a split-key kernel (one 64-key block and 16 query
                  rows per program: a small accumulator at head_dim 256) and a kernel merging the splits
  gated_residual: x1 = x + gate1 * (attn @ Wo^T)
  geglu:          h = rms(x1) * (1 + scale2) + shift2 -> gelu_tanh(h @ Wg^T) * (h @ Wu^T)
  gated_residual: x2 = x1 + gate2 * (hidden @ Wd^T)

Each program owns BLOCK_N output columns (two column blocks for RoPE pairs (d, d + hd/2) and for
(gate, up) pairs) for BLOCK_M rows, streams its weight rows once over K, and accumulates in fp32 with
`tl.dot` (rows padded to 16: the tensor-core minimum). Weights may be FP8 (e4m3, per-tensor scale,
the `fp8` backend's expert MLP): they are converted to bf16 in registers after the load, so FP8 halves
the bytes streamed; the activations stay bf16 (weight-only quantization, unlike `_scaled_mm`).
Roundings follow the eager model: each product rounds to the model dtype before its epilogue.

On a GPU the products are autotuned over a few block shapes per (M, N, K) at warm-up. Without CUDA
the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), which is
how CI checks their maths on the CPU, in fp32 and in bf16: the interpreter cannot multiply bf16 dot
operands (they are multiplied as fp32 there: the same products and fp32 sums) and truncates casts to
bf16 (`_rnd` rounds to nearest even by hand there), so its bf16 results equal the GPU's roundings. `ExpertKernels` checks every kernel against its torch
reference on its first call (warm-up, before graph capture) and falls back to the reference, with a
warning and a note in `status`, if the kernel fails to build or disagrees.

References: Triton's matmul tutorial (tutorials/03-matrix-multiplication.py) for the tiling; gpt-fast
and "Flash-Decoding" for weight-streaming skinny products; openpi gemma.py for the layer maths.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from policy.backends.fused import ExpertWeights

log = logging.getLogger(__name__)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GELU_C = math.sqrt(2.0 / math.pi)

# Block shapes tried at warm-up on a GPU (autotune keyed on M, N, K). BLOCK_N 16/32 gives 64-256
# programs per product at N = 1024-8192 for the H200's 132 SMs; BLOCK_M 64 is for batch 16 (160 rows)
# and is not even compiled for one observation (10 rows): see prune_configs.
CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
]


# ----- kernels -------------------------------------------------------------------------------------

_INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def _rnd(x, dt: tl.constexpr):
    """fp32 x in dtype dt, rounded to nearest even (what a GPU's cast does). The interpreter's casts to
    bf16 truncate: there the rounding is done on the bits first, so the cast after it is exact."""
    if _INTERPRETED:
        if dt == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _row_rstd(x_ptr, rows, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of each row of x (M, K), in fp32."""
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                    other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    return tl.rsqrt(sq / K + eps)


@triton.jit
def _dot(a, w, acc, IEEE: tl.constexpr):
    """acc + a @ w^T for a (BLOCK_M, BLOCK_K) and w (BLOCK_N, BLOCK_K); fp32 operands exactly (IEEE).
    The interpreter (IEEE there for every dtype) multiplies bf16 operands as fp32: the same products and
    fp32 sums as a bf16 tensor-core dot, which its numpy backend cannot do."""
    if IEEE:
        acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        acc += tl.dot(a, tl.trans(w))
    return acc


@triton.jit
def _stream(a_ptr, w_ptr, rows, cols1, cols2, M, N, K, rstd, scale_ptr, shift_ptr,
            NORM: tl.constexpr, PAIRED: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """a (M, K) @ w[cols1]^T (and w[cols2]^T when PAIRED) in fp32, a first modulated by adaRMS when
    NORM: a -> (a * rstd * (1 + scale) + shift) rounded to a's dtype, as the eager model feeds it."""
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok = rows[:, None] < M
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok & k_ok[None, :], other=0.0)
        if NORM:
            sc = tl.load(scale_ptr + ks, mask=k_ok, other=0.0)
            sh = tl.load(shift_ptr + ks, mask=k_ok, other=0.0)
            h = a.to(tl.float32) * rstd[:, None] * (1.0 + sc[None, :]) + sh[None, :]
            a = _rnd(h, a_ptr.dtype.element_ty)
        w1 = tl.load(w_ptr + cols1[:, None] * K + ks[None, :], mask=(cols1[:, None] < N) & k_ok[None, :], other=0.0)
        acc1 = _dot(a, w1.to(a_ptr.dtype.element_ty), acc1, IEEE)  # FP8 weights: converted in registers
        if PAIRED:
            w2 = tl.load(w_ptr + cols2[:, None] * K + ks[None, :], mask=(cols2[:, None] < N) & k_ok[None, :],
                         other=0.0)
            acc2 = _dot(a, w2.to(a_ptr.dtype.element_ty), acc2, IEEE)
    return acc1, acc2


@triton.jit(do_not_specialize=["M"])  # one binary for 10 and 160 rows (M only masks)
def _qkv_rope_kernel(x_ptr, w_ptr, w_scale_ptr, scale_ptr, shift_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                     M, N, K, T, KEYS, prefix_len, eps,
                     NQ: tl.constexpr, HD: tl.constexpr, W_FP8: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (pid_n, pid_m): output columns d and d + HD/2 of one head (a RoPE pair), rows of one block
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    head = pid_n // (HD // 2 // BLOCK_N)  # 0..NQ-1: query heads, NQ: the k head, NQ + 1: the v head
    d = (pid_n % (HD // 2 // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)  # in [0, HD/2)
    cols1 = head * HD + d
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rstd = _row_rstd(x_ptr, rows, M, K, eps, BLOCK_M, BLOCK_K)
    acc1, acc2 = _stream(x_ptr, w_ptr, rows, cols1, cols1 + HD // 2, M, N, K, rstd, scale_ptr, shift_ptr,
                         True, True, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    if W_FP8:
        ws = tl.load(w_scale_ptr)
        acc1 = acc1 * ws
        acc2 = acc2 * ws
    dt = q_ptr.dtype.element_ty
    y1 = _rnd(acc1, dt).to(tl.float32)  # the projection's output, rounded as F.linear rounds it
    y2 = _rnd(acc2, dt).to(tl.float32)
    row_ok = rows[:, None] < M
    # split-half RoPE, x * cos + rotate_half(x) * sin: [y1 | y2] -> [y1 cos1 - y2 sin1 | y2 cos2 + y1 sin2]
    # with cos/sin (M, HD) (their halves are equal for real positions; read both, as apply_rope does)
    cs = rows[:, None] * HD + d[None, :]
    cos1 = tl.load(cos_ptr + cs, mask=row_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + cs, mask=row_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + cs + HD // 2, mask=row_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + cs + HD // 2, mask=row_ok, other=0.0).to(tl.float32)
    rope = head <= NQ  # v is not rotated
    o1 = _rnd(tl.where(rope, y1 * cos1 - y2 * sin1, y1), dt)
    o2 = _rnd(tl.where(rope, y2 * cos2 + y1 * sin2, y2), dt)
    if head < NQ:
        # q (M, NQ * HD): row m = b * T + t, column = head * HD + d, i.e. (B, T * H, hd) as attention reads it
        dst = q_ptr + rows[:, None] * (NQ * HD) + cols1[None, :]
        tl.store(dst, o1, mask=row_ok)
        tl.store(dst + HD // 2, o2, mask=row_ok)
    else:
        # k or v of action token t of batch row b: cache (B, KEYS, HD) row prefix_len + t
        kv = ((rows // T) * KEYS + prefix_len + rows % T)[:, None] * HD + d[None, :]
        if head == NQ:
            tl.store(k_ptr + kv, o1, mask=row_ok)
            tl.store(k_ptr + kv + HD // 2, o2, mask=row_ok)
        else:
            tl.store(v_ptr + kv, o1, mask=row_ok)
            tl.store(v_ptr + kv + HD // 2, o2, mask=row_ok)


@triton.jit(do_not_specialize=["M"])  # one binary for 10 and 160 rows (M only masks)
def _gated_residual_kernel(a_ptr, w_ptr, w_scale_ptr, res_ptr, gate_ptr, out_ptr, M, N, K,
                           W_FP8: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = res + gate * (a @ w^T): the expert's gated residual after o_proj and down_proj."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    no_rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, _ = _stream(a_ptr, w_ptr, rows, cols, cols, M, N, K, no_rstd, gate_ptr, gate_ptr,
                     False, False, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    if W_FP8:
        acc = acc * tl.load(w_scale_ptr)
    dt = out_ptr.dtype.element_ty
    col_ok = cols < N
    ok = (rows[:, None] < M) & col_ok[None, :]
    gate = _rnd(tl.load(gate_ptr + cols, mask=col_ok, other=0.0), dt).to(tl.float32)
    res = tl.load(res_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gated = _rnd(_rnd(acc, dt).to(tl.float32) * gate[None, :], dt).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], _rnd(res + gated, dt), mask=ok)


@triton.jit(do_not_specialize=["M"])  # one binary for 10 and 160 rows (M only masks)
def _geglu_kernel(x_ptr, w_ptr, w_scale_ptr, scale_ptr, shift_ptr, out_ptr, M, N, K, eps,
                  W_FP8: tl.constexpr, IEEE: tl.constexpr, GELU_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, N // 2) = gelu_tanh(h @ Wg^T) * (h @ Wu^T), h = adaRMS(x); w = [Wg ; Wu] (N, K)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    hidden = N // 2
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # gate column c pairs with up column hidden + c
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rstd = _row_rstd(x_ptr, rows, M, K, eps, BLOCK_M, BLOCK_K)
    acc_g, acc_u = _stream(x_ptr, w_ptr, rows, cols, cols + hidden, M, N, K, rstd, scale_ptr, shift_ptr,
                           True, True, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    if W_FP8:
        ws = tl.load(w_scale_ptr)
        acc_g = acc_g * ws
        acc_u = acc_u * ws
    dt = out_ptr.dtype.element_ty
    g = _rnd(acc_g, dt).to(tl.float32)
    u = _rnd(acc_u, dt).to(tl.float32)
    z = GELU_C * (g + 0.044715 * g * g * g)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # tanh(z), saturating correctly for large |z|
    act = _rnd(0.5 * g * (1.0 + tanh), dt).to(tl.float32)
    ok = (rows[:, None] < M) & (cols[None, :] < hidden)
    tl.store(out_ptr + rows[:, None] * hidden + cols[None, :], _rnd(act * u, dt), mask=ok)


MASKED = -2.3819763e38  # openpi's big_neg, as the compile backend's key bias holds it
ATTN_BLOCK_Q, ATTN_BLOCK_S, ATTN_BLOCK_D = 16, 64, 64


@triton.jit
def _attention_split_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, m_ptr, l_ptr, acc_ptr, RB, S, R, sm_scale,
                            HD: tl.constexpr, IEEE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (pid_q, split, b): BLOCK_Q query rows of batch row b (RB = T * H rows each, all heads sharing
    the one K/V head) against the BLOCK_S keys of one split; writes that split's row max, row sum of
    exp and unnormalized exp-weighted values, merged by _attention_combine_kernel (flash-decoding).
    One key block per program and 16 query rows keep the (16, hd) fp32 accumulator small at hd 256."""
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    qr = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qr < RB
    rows = b * RB + qr  # rows of q (B * T * H, HD): row (b * T + t) * H + h
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + rows[:, None] * HD + d[None, :], mask=q_ok[:, None], other=0.0)
    ks = split * BLOCK_S + tl.arange(0, BLOCK_S)
    k_ok = ks < S
    kv = (b * S + ks)[:, None] * HD + d[None, :]  # cache (B, S, HD)
    k = tl.load(k_ptr + kv, mask=k_ok[:, None], other=0.0)
    dt = q_ptr.dtype.element_ty
    scores = _dot(q, k, tl.zeros((BLOCK_Q, BLOCK_S), dtype=tl.float32), IEEE)
    # as the eager attention: bf16 scores, then scaled and masked in fp32
    bias = tl.load(bias_ptr + b * S + ks, mask=k_ok, other=-2.3819763e38)
    scores = _rnd(scores, dt).to(tl.float32) * sm_scale + bias[None, :]
    m = tl.max(scores, axis=1)
    p = tl.exp(scores - m[:, None])
    v = tl.load(v_ptr + kv, mask=k_ok[:, None], other=0.0)
    if IEEE:
        acc = tl.dot(_rnd(p, dt).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(p.to(dt), v)
    ws = split * R + rows  # workspace row of this split
    tl.store(m_ptr + ws, m, mask=q_ok)
    tl.store(l_ptr + ws, tl.sum(p, axis=1), mask=q_ok)
    tl.store(acc_ptr + ws[:, None] * HD + d[None, :], acc, mask=q_ok[:, None])


@triton.jit
def _attention_combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, R, NSPLIT,
                              HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out (R, HD) = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the splits (M = max_s m_s); a split
    whose keys are all masked has m_s ~ -2.4e38 and weighs exactly 0."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    top = tl.load(m_ptr + rows, mask=r_ok, other=0.0)
    for sp in range(1, NSPLIT):
        top = tl.maximum(top, tl.load(m_ptr + sp * R + rows, mask=r_ok, other=0.0))
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for sp in range(0, NSPLIT):
        w = tl.exp(tl.load(m_ptr + sp * R + rows, mask=r_ok, other=0.0) - top)
        total += w * tl.load(l_ptr + sp * R + rows, mask=r_ok, other=1.0)
        part = tl.load(acc_ptr + (sp * R + rows)[:, None] * HD + d[None, :], mask=r_ok[:, None], other=0.0)
        acc += w[:, None] * part
    out = acc / total[:, None]
    tl.store(out_ptr + rows[:, None] * HD + d[None, :], _rnd(out, out_ptr.dtype.element_ty), mask=r_ok[:, None])


def prune_configs(configs, named_args, **kwargs):
    """Autotune's early pruning: at most 16 rows (batch 1) need no 64-row blocks (fewer compiles at warm-up)."""
    m = kwargs.get("M", named_args.get("M") if isinstance(named_args, dict) else None)
    if m is None or m > 16:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] <= 16] or configs


_TUNED = {fn: triton.autotune(configs=CONFIGS, key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune_configs})(fn)
          for fn in (_qkv_rope_kernel, _gated_residual_kernel, _geglu_kernel)}


def _launch(fn, grid_fn, args: dict, m: int, pair_width: int | None):
    """Autotuned on a GPU; in the interpreter, the smallest blocks that fit (it runs programs one by one)."""
    if not INTERPRET:
        _TUNED[fn][grid_fn](**args)
        return
    blocks = {"BLOCK_M": 16 if m <= 16 else 32, "BLOCK_N": min(16, pair_width or 16), "BLOCK_K": 32}
    fn[grid_fn(blocks)](**args, **blocks)


# ----- launchers --------------------------------------------------------------------------------------

def _unpack(w):
    """(matrix, scale tensor or None): bf16/fp32 weights, or the fp8 backend's Fp8Matrix (w8, w_scale, x_scale)."""
    if isinstance(w, tuple):
        return w[0], w[1]
    return w, None


def _common(a: torch.Tensor, w) -> dict:
    mat, scale = _unpack(w)
    if not (a.is_contiguous() and mat.is_contiguous()):
        raise ValueError("expert kernels need contiguous activations and weights")
    if mat.shape[1] != a.shape[1]:
        raise ValueError(f"weight {tuple(mat.shape)} does not take inputs of width {a.shape[1]}")
    return {"w_ptr": mat, "w_scale_ptr": mat if scale is None else scale, "M": a.shape[0], "N": mat.shape[0],
            "K": a.shape[1], "W_FP8": scale is not None, "IEEE": a.dtype == torch.float32 or INTERPRET}


def qkv_rope(x, w, scale, shift, cos, sin, q, k_cache, v_cache, prefix_len: int, heads: int, eps: float) -> None:
    """x (B, T, width) -> q (B * T, H * hd); k, v into k_cache/v_cache (B, KEYS, hd)[:, prefix_len:prefix_len + T]."""
    b, t, width = x.shape
    hd = k_cache.shape[-1]
    x2 = x.reshape(b * t, width)  # (M, width), row m = b * T + t
    args = _common(x2, w)
    widest = max(c.kwargs["BLOCK_N"] for c in CONFIGS) if not INTERPRET else min(16, hd // 2)
    if args["N"] != (heads + 2) * hd or (hd // 2) % widest:
        raise ValueError(f"qkv of {args['N']} rows and head_dim {hd} do not fit {heads} + 2 heads of RoPE pairs")
    for buf in (cos, sin, q, k_cache, v_cache):
        if not buf.is_contiguous():
            raise ValueError("expert kernels need contiguous cos/sin, q and cache buffers")
    args.update(x_ptr=x2, scale_ptr=scale, shift_ptr=shift, cos_ptr=cos, sin_ptr=sin, q_ptr=q, k_ptr=k_cache,
                v_ptr=v_cache, T=t, KEYS=k_cache.shape[1], prefix_len=prefix_len, eps=eps, NQ=heads, HD=hd)
    grid = lambda meta: ((heads + 2) * (hd // 2 // meta["BLOCK_N"]), triton.cdiv(b * t, meta["BLOCK_M"]))  # noqa: E731
    _launch(_qkv_rope_kernel, grid, args, b * t, hd // 2)


def gated_residual(a, w, res, gate, out) -> None:
    """out (M, N) = res + gate * (a (M, K) @ w^T)."""
    args = _common(a, w)
    args.update(a_ptr=a, res_ptr=res, gate_ptr=gate, out_ptr=out)
    grid = lambda meta: (triton.cdiv(args["N"], meta["BLOCK_N"]), triton.cdiv(args["M"], meta["BLOCK_M"]))  # noqa: E731
    _launch(_gated_residual_kernel, grid, args, args["M"], None)


def geglu(x, w, scale, shift, out, eps: float) -> None:
    """out (M, mlp) = gelu_tanh(h @ Wg^T) * (h @ Wu^T), h = adaRMS(x (M, width)); w = [Wg ; Wu]."""
    args = _common(x, w)
    hidden = args["N"] // 2
    args.update(x_ptr=x, scale_ptr=scale, shift_ptr=shift, out_ptr=out, eps=eps, GELU_C=GELU_C)
    grid = lambda meta: (triton.cdiv(hidden, meta["BLOCK_N"]), triton.cdiv(args["M"], meta["BLOCK_M"]))  # noqa: E731
    _launch(_geglu_kernel, grid, args, args["M"], hidden)


def attention(q, k_cache, v_cache, bias, out) -> None:
    """out (B * T * H, hd) = softmax(q k^T / sqrt(hd) + bias) v for q (B, T * H, hd) over the cache
    (B, S, hd) (one K/V head for all heads), bias (B, 1, S) fp32: split-key attention plus a merge."""
    b, rb, hd = q.shape
    s = k_cache.shape[1]
    for t in (q, k_cache, v_cache, bias, out):
        if not t.is_contiguous():
            raise ValueError("the expert attention kernels need contiguous q, cache, bias and output")
    if bias.shape != (b, 1, s) or bias.dtype != torch.float32 or hd & (hd - 1):
        raise ValueError(f"attention needs a (B, 1, S) fp32 bias and a power-of-two head_dim, got {tuple(bias.shape)}, {hd}")
    r, nsplit = b * rb, triton.cdiv(s, ATTN_BLOCK_S)
    m = torch.empty(nsplit, r, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(nsplit, r, hd, device=q.device, dtype=torch.float32)
    ieee = q.dtype == torch.float32 or INTERPRET
    _attention_split_kernel[(triton.cdiv(rb, ATTN_BLOCK_Q), nsplit, b)](
        q, k_cache, v_cache, bias, m, lsum, acc, rb, s, r, hd ** -0.5,
        HD=hd, IEEE=ieee, BLOCK_Q=ATTN_BLOCK_Q, BLOCK_S=ATTN_BLOCK_S, num_warps=8)
    block_d = min(ATTN_BLOCK_D, hd)
    _attention_combine_kernel[(triton.cdiv(r, 16), hd // block_d)](
        m, lsum, acc, out, r, nsplit, HD=hd, BLOCK_R=16, BLOCK_D=block_d, num_warps=4)


# ----- the same fusions in torch (the reference each kernel is checked against, and the fallback) ---

def _product(h, w):
    """h @ w^T rounded to h's dtype; FP8 weights are dequantized exactly (fp32 product, then the scale)."""
    mat, scale = _unpack(w)
    if scale is None:
        return F.linear(h, mat)
    return (F.linear(h.float(), mat.float()) * scale).to(h.dtype)


def _modulate(x, scale, shift, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + scale) + shift).to(x.dtype)


def qkv_rope_reference(x, w, scale, shift, cos, sin, q, k_cache, v_cache, prefix_len: int, heads: int, eps: float) -> None:
    b, t, width = x.shape
    hd = k_cache.shape[-1]
    y = _product(_modulate(x.reshape(b * t, width), scale, shift, eps), w).float()  # (M, (H + 2) hd)
    y = y.view(b * t, heads + 2, hd)
    half = hd // 2
    c, s = cos.reshape(b * t, 1, hd).float(), sin.reshape(b * t, 1, hd).float()
    rotated = torch.cat([-y[..., half:], y[..., :half]], dim=-1)
    roped = (y * c + rotated * s).to(x.dtype)  # (M, H + 2, hd)
    q.copy_(roped[:, :heads].reshape(b * t, heads * hd))
    k_cache[:, prefix_len:prefix_len + t].copy_(roped[:, heads].view(b, t, hd))
    v_cache[:, prefix_len:prefix_len + t].copy_(y[:, heads + 1].to(x.dtype).view(b, t, hd))


def gated_residual_reference(a, w, res, gate, out) -> None:
    dt = out.dtype
    out.copy_(res + _product(a, w) * gate.to(dt))


def geglu_reference(x, w, scale, shift, out, eps: float) -> None:
    g, u = _product(_modulate(x, scale, shift, eps), w).chunk(2, dim=-1)
    out.copy_(F.gelu(g, approximate="tanh") * u)


def attention_reference(q, k_cache, v_cache, bias, out) -> None:
    """The compile backend's attention (bf16 scores, fp32 softmax, bf16 probabilities)."""
    b, rb, hd = q.shape
    scores = q @ k_cache.transpose(1, 2)  # (B, T * H, S)
    probs = torch.softmax(scores.float() * hd ** -0.5 + bias, dim=-1).to(v_cache.dtype)
    out.copy_((probs @ v_cache).reshape(b * rb, hd))


KERNELS = {
    "attention": (attention, attention_reference),
    "qkv_rope": (qkv_rope, qkv_rope_reference),
    "gated_residual": (gated_residual, gated_residual_reference),
    "geglu": (geglu, geglu_reference),
}


# ----- one expert layer through the kernels -----------------------------------------------------------

class ExpertKernels:
    """The expert layers of a denoise step through the fused kernels. `attention(q, k, v, bias)`:
    q (B, T * H, hd) over the cache -> (B, T, H * hd), the backend's (compiled) attention; None: the
    split-key attention kernels here.

    `status` maps "product@M" (qkv_rope, attention, o_residual, geglu, down_residual) to "ok: ..." or "fallback: ..." once each kernel has run at M rows."""

    def __init__(self, heads: int, eps: float, attention, check_tol: float = 3e-2):
        self.heads, self.eps, self.attention = heads, eps, attention
        self.check_tol = check_tol
        self.status: dict[str, str] = {}

    def _run(self, name: str, label: str, m: int, args: tuple, outputs) -> None:
        """Run kernel `name` (as `label`); on its first call at M rows, check it against its torch reference."""
        kernel, reference = KERNELS[name]
        key = f"{label}@{m}"
        state = self.status.get(key)
        if state is not None:
            (reference if state.startswith("fallback") else kernel)(*args)
            return
        try:
            kernel(*args)
            got = [o.clone() for o in outputs()]
        except Exception as exc:  # a kernel that does not build here must not sink the sampler
            self.status[key] = f"fallback: {type(exc).__name__}: {str(exc)[:300]}"
            log.warning("Triton kernel %s failed (%s); using its torch reference", key, self.status[key])
            reference(*args)
            return
        reference(*args)
        want = [o.float() for o in outputs()]
        err = max(float((g.float() - w).abs().max()) for g, w in zip(got, want))
        scale = max(float(w.abs().max()) for w in want)
        if math.isfinite(err) and err <= self.check_tol * scale + 1e-5:
            self.status[key] = f"ok: max |triton - torch| {err:.2e} (|torch| max {scale:.2e})"
            kernel(*args)  # leave the kernel's own results in the outputs
        else:
            self.status[key] = f"fallback: mismatch, max |triton - torch| {err:.2e} (|torch| max {scale:.2e})"
            log.warning("Triton kernel %s disagrees with torch (%s); using the torch reference", key, self.status[key])

    def layer(self, x, mods, cos, sin, bias, k_cache, v_cache, w: ExpertWeights, prefix_len: int):
        """One expert layer: x (B, T, width) -> (B, T, width); mods (6, width) fp32 [scale, shift, gate] x 2."""
        b, t, width = x.shape
        m, hd = b * t, k_cache.shape[-1]
        eps, heads = self.eps, self.heads
        q = x.new_empty(m, heads * hd)
        self._run("qkv_rope", "qkv_rope", m, (x, w.qkv, mods[0], mods[1], cos, sin, q, k_cache, v_cache, prefix_len, heads, eps),
                  lambda: (q, k_cache[:, prefix_len:prefix_len + t], v_cache[:, prefix_len:prefix_len + t]))
        if self.attention is None:
            attn = x.new_empty(m * heads, hd)  # (B * T * H, hd): the same memory as (M, H * hd)
            self._run("attention", "attention", m, (q.view(b, t * heads, hd), k_cache, v_cache, bias, attn),
                      lambda: (attn,))
            attn = attn.view(m, heads * hd)
        else:
            attn = self.attention(q.view(b, t * heads, hd), k_cache, v_cache, bias).reshape(m, heads * hd).contiguous()
        x1 = x.new_empty(m, width)
        self._run("gated_residual", "o_residual", m, (attn, w.o, x.reshape(m, width), mods[2], x1), lambda: (x1,))
        hidden = x.new_empty(m, _unpack(w.down)[0].shape[1])
        self._run("geglu", "geglu", m, (x1, w.gate_up, mods[3], mods[4], hidden, eps), lambda: (hidden,))
        x2 = x.new_empty(m, width)
        self._run("gated_residual", "down_residual", m, (hidden, w.down, x1, mods[5], x2), lambda: (x2,))
        return x2.view(b, t, width)

    def stack(self, x, mods, cos, sin, bias, ks, vs, weights, prefix_len: int):
        """Every expert layer of one step; mods (depth, 6, width)."""
        for i, w in enumerate(weights):
            x = self.layer(x, mods[i], cos, sin, bias, ks[i], vs[i], w, prefix_len)
        return x
