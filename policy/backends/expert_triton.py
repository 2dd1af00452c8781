"""Fused Triton kernels for the action expert's denoising step: the `expert_kernels="triton"` option of
the `compile` and `fp8` backends (policy/backends/compiled.py), with a pure-torch reference of each fusion.

Why: at batch 1 a step is 18 layers over 10 action tokens. The four weight products of a layer (34.6 MB
of bf16) stream in ~8 us at the H200's bandwidth, but as cuBLAS calls with norm / RoPE / gate kernels
between them a layer takes ~45 us: each small kernel pays its launch, a ramp-up, a serial chain of
memory round trips and a tail. A layer here is five kernels:

  qkv_rope:       h = rms(x) * (1 + scale1) + shift1 -> h @ Wqkv^T -> RoPE on q and k -> q into a
                  (M, H * hd) buffer, k and v straight into the static KV cache after the prefix
  attention:      q (10 tokens x 8 heads share the one K/V head) over [prefix K/V ; own K/V], split over
                  key blocks (flash-decoding), the splits merged by the block that finishes last
  gated_residual: x1 = x + gate1 * (attn @ Wo^T)
  geglu:          h = rms(x1) * (1 + scale2) + shift2 -> gelu_tanh(h @ Wg^T) * (h @ Wu^T)
  gated_residual: x2 = x1 + gate2 * (hidden @ Wd^T)

How each kernel gets close to its bytes (one observation, M = 10 rows):
* split-K: a program owns BLOCK_N output columns (two column blocks for RoPE pairs (d, d + hd/2) and for
  (gate, up) pairs) and ONE BLOCK_K slice of K, so a product runs as 300-600 programs that each load
  one weight tile at once (one memory round trip, many in flight) instead of 64-256 programs looping
  over K. Partial sums go to a workspace; the program that finishes a tile's last slice (a per-tile
  counter, reset by that program) sums the slices in a fixed order (deterministic) and runs the
  epilogue. With more rows (batch > 1) a program loops over K instead (no workspace).
* the adaRMS norm needs no pass of its own: h @ W^T = rstd * ((x * (1 + scale)) @ W^T) + shift @ W^T, so
  each slice also returns its partial sum of squares and shift @ W^T, and the epilogue applies rstd.
* programmatic dependent launch (Hopper; `launch_pdl`): a kernel starts while the previous one is
  finishing and loads its weight tile (and everything else that does not depend on the previous
  kernel: the prefix's K/V, masks, modulations) before `gdc_wait`; its launch and its weight loads
  hide behind the previous kernel's tail. Everything written by earlier kernels, the workspace and the
  counters included, is touched only after the wait.

Rounding: products accumulate in fp32 and round to the model dtype before their epilogue, as F.linear
does; x * (1 + scale) is rounded to the model dtype as the tensor-core operand where the eager model
rounds h itself, so bf16 results differ from the references by bf16 roundings (the checks' tolerance).
Weights may be FP8 (e4m3, per-tensor scale, the `fp8` backend's expert MLP): converted to bf16 in
registers after the load, so FP8 halves the bytes streamed (weight-only quantization).

On a GPU the products are autotuned over a few block shapes per (M, N, K) at warm-up. Without CUDA the
kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), which is how CI
checks their maths on the CPU, in fp32 and in bf16, both the split-K path (10 rows) and the K loop (more
rows): the interpreter multiplies bf16 dot operands as fp32 (the same products and fp32 sums) and
truncates casts to bf16 (`_rnd` rounds to nearest even by hand there). It runs programs one after
another, so it checks the reduction's arithmetic, not its memory ordering: that is the GPU tests' job
(tests/test_gpu.py compares every kernel with its reference at real size, and replays a sampler's
captured graphs many times expecting the same bits), and tests/test_expert_kernels_compile.py checks
in the PTX that nothing but weights and constants is loaded before the wait.
`ExpertKernels` checks every kernel against its torch reference on its first call (warm-up, before
graph capture) and falls back to the reference, with a warning and a note in `status`, if the kernel
fails to build or disagrees.

The kernels' bodies are @triton.jit tile functions (`_qkv_rope_tile`, `_attention_tile`, ...) that take their
tile ids and how to wait for their inputs; the persistent step kernel (policy/backends/expert_step.py) runs
the same bodies as the work items of its stages, waiting on its grid barriers instead of PDL.

References: Triton's matmul tutorial (tutorials/03-matrix-multiplication.py) for the tiling; gpt-fast
and "Flash-Decoding" for weight-streaming skinny products and split-key attention; CUTLASS's split-K
"serial reduction" (a semaphore per output tile) for the last-program reduction; CUDA's programmatic
dependent launch and Triton's `tl.extra.cuda.gdc_wait`; openpi gemma.py for the layer maths.
"""

from __future__ import annotations

import functools
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

# Block shapes tried at warm-up on a GPU (autotune keyed on M, N, K; prune_configs keeps the split-K
# shapes for one observation and the K-loop shapes for more rows). Split-K, 10 rows: BLOCK_K 128-1024
# gives 1-32 slices and hundreds of programs for the H200's 132 SMs, one (BLOCK_N, BLOCK_K) weight tile each.
CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": True}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": True}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": True}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": True}, num_warps=4, num_stages=1),
    # fewer, larger slices: less workspace traffic (one slice of all of K = 1024 needs no reduction at all)
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": True}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 1024, "SPLIT_K": True}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": False}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": False}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": False}, num_warps=8, num_stages=3),
]
SPLIT_ROWS = 16  # up to this many rows the products split K; beyond, a program loops over K
WIDEST_N = max(c.kwargs["BLOCK_N"] for c in CONFIGS)  # q|k|v tiles hold RoPE pairs: head_dim / 2 must divide by it
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}  # small: the interpreter runs programs one by one
# what sizes the split-K workspace: the narrowest K slice (most slices) and the rows the split shapes pad to
SLICE_K = INTERPRETER_BLOCKS["BLOCK_K"] if INTERPRET else min(c.kwargs["BLOCK_K"] for c in CONFIGS if c.kwargs["SPLIT_K"])
SPLIT_BLOCK_M = INTERPRETER_BLOCKS["BLOCK_M"] if INTERPRET else max(c.kwargs["BLOCK_M"] for c in CONFIGS if c.kwargs["SPLIT_K"])


# ----- kernels -------------------------------------------------------------------------------------

_INTERPRETED = tl.constexpr(INTERPRET)
SPIN_LIMIT = tl.constexpr(1 << 24)  # polls of a grid barrier before it gives up (seconds; never in a healthy run)


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
def _wait_for_inputs(PDL: tl.constexpr):
    """Programmatic dependent launch: block until the previous kernel has finished and its writes are
    visible, then let the next kernel start launching (it only prefetches until its own wait)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pause():
    """A short sleep between two polls of a barrier counter (fewer loads of one L2 line, which the weight
    stream shares); nothing in the interpreter."""
    if not _INTERPRETED:
        tl.inline_asm_elementwise("nanosleep.u32 64;\nmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def now_ns():
    """The GPU's global timer in ns (comparable across SMs), for the step kernel's trace; 0 in the interpreter."""
    if _INTERPRETED:
        return tl.zeros((), dtype=tl.int64)
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _load_acquire(ptr):
    """An int32 load with acquire semantics at GPU scope: once it reads a value a release wrote, this thread's
    later loads see what preceded that release. Inline PTX: an `atomic_add(ptr, 0, sem="acquire")` after
    the polls compiled to nothing in Triton 3.6 (the GPU image's), leaving no acquire at all."""
    if _INTERPRETED:
        return tl.load(ptr, volatile=True)
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _grid_wait(bar_ptr, nprog, err_ptr, SLEEP: tl.constexpr):
    """Inside the persistent step kernel (policy/backends/expert_step.py): poll barrier counter `bar_ptr` with
    acquire loads until all `nprog` programs have arrived (each after its stores), so this program's later
    loads see what they released. Gives up after SPIN_LIMIT polls, or at once when the sticky error flag
    is up (another program gave up, now or in an earlier launch), and raises the flag: the launch then
    finishes quickly with wrong values, which its launcher turns into NaN."""
    n = _load_acquire(bar_ptr)
    bad = tl.load(err_ptr, volatile=True)
    polls = 0
    while (n < nprog) & (polls < SPIN_LIMIT) & (bad == 0):
        if SLEEP:
            _pause()
        n = _load_acquire(bar_ptr)
        bad = tl.load(err_ptr, volatile=True)
        polls += 1
    if n < nprog:
        tl.atomic_xchg(err_ptr, 1)
    tl.debug_barrier()


@triton.jit
def _stage_wait(PDL: tl.constexpr, BAR: tl.constexpr, bar_ptr, nprog, err_ptr, wait_now):
    """Wait for the inputs the previous stage writes: the previous kernel (PDL), or the previous stage of
    the persistent kernel (BAR: its barrier, if `wait_now`: a program's first item of a stage; BAR = 2
    sleeps between polls, 1 spins)."""
    _wait_for_inputs(PDL)
    if BAR:
        if wait_now:
            _grid_wait(bar_ptr, nprog, err_ptr, BAR == 2)


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
def _load_w(w_ptr, cols, ks, N, K: tl.constexpr):
    return tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)


@triton.jit
def _slice_operands(w_ptr, cols1, cols2, ks, N1, N, K: tl.constexpr, scale_ptr, shift_ptr,
                    NORM: tl.constexpr, PAIRED: tl.constexpr, BLOCK_K: tl.constexpr):
    """What a K slice multiplies that no earlier kernel writes: the weight tile(s) (cols1 valid below N1,
    cols2 below N), and for NORM the adaRMS scale and shift of the slice's columns (zeros otherwise)."""
    w1 = _load_w(w_ptr, cols1, ks, N1, K)
    w2 = w1
    if PAIRED:
        w2 = _load_w(w_ptr, cols2, ks, N, K)
    sc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    sh = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if NORM:
        sc = tl.load(scale_ptr + ks, mask=ks < K, other=0.0)
        sh = tl.load(shift_ptr + ks, mask=ks < K, other=0.0)
    return w1, w2, sc, sh


@triton.jit
def _load_act(ptrs, mask, CG: tl.constexpr):
    """Activations: with CG (written by other programs of the same persistent kernel) read from L2,
    never from a line this SM's L1 kept from an earlier stage."""
    if CG:
        return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _mac(x_ptr, rows, ks, M, K: tl.constexpr, w1, w2, sc, sh, acc1, acc2, sq, sh1, sh2,
         NORM: tl.constexpr, PAIRED: tl.constexpr, IEEE: tl.constexpr, CG: tl.constexpr, BLOCK_M: tl.constexpr):
    """One K slice: acc += a @ w^T (a = x * (1 + sc) when NORM, rounded to x's dtype as the dot's operand),
    and for NORM the slice's sum of squares of x per row and shift @ w^T (summed over sh's rows), all fp32."""
    dt = x_ptr.dtype.element_ty
    a = _load_act(x_ptr + rows[:, None] * K + ks[None, :], (rows[:, None] < M) & (ks[None, :] < K), CG)
    w1 = w1.to(dt)  # FP8 weights: converted in registers
    w2 = w2.to(dt)
    if NORM:
        af = a.to(tl.float32)
        sq += tl.sum(af * af, axis=1)
        a = _rnd(af * (1.0 + sc[None, :]), dt)
        # shift @ w^T on the tensor cores, not from an fp32 copy of the weight tile (that tripled the registers
        # and made ptxas spill the larger tiles): the shift as two operand rows, hi = dt(shift) and lo = the
        # rest rounded, of an otherwise zero block; sh1/sh2 (BLOCK_M, BLOCK_N) sum to shift @ w^T over rows
        hi = _rnd(sh, dt).to(tl.float32)
        r = tl.arange(0, BLOCK_M)[:, None]
        s_op = _rnd(tl.where(r == 0, hi[None, :], tl.where(r == 1, (sh - hi)[None, :], 0.0)), dt)
        sh1 = _dot(s_op, w1, sh1, IEEE)
        if PAIRED:
            sh2 = _dot(s_op, w2, sh2, IEEE)
    acc1 = _dot(a, w1, acc1, IEEE)
    if PAIRED:
        acc2 = _dot(a, w2, acc2, IEEE)
    return acc1, acc2, sq, sh1, sh2


@triton.jit
def _product(x_ptr, w_ptr, ws_ptr, cnt_ptr, rows, cols1, cols2, M, N1, N, K: tl.constexpr, scale_ptr, shift_ptr,
             NORM: tl.constexpr, PAIRED: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
             pid_k, tile, m_pad, BAR: tl.constexpr, bar_ptr, nprog, err_ptr, wait_now, CG: tl.constexpr):
    """The tile (rows, cols1 [, cols2]) of x @ w^T (w: N rows of K) over all of K, in fp32, with (for NORM)
    each row's sum of squares of x and shift @ w^T per column; columns cols1 >= N1 and cols2 >= N are
    outside the product (masked: GEGLU's gate columns end where its up columns begin). Returns (acc1, acc2, sq, sh1, sh2, last): with SPLIT_K
    only the program that completes the tile (last) holds the full sums; the others hold partials.
    pid_k: this program's K slice; tile: the output tile's counter; m_pad: rows as the workspace pads
    them; the rest says how to wait for the activations (`_stage_wait`) and read them (CG)."""
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sh1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # shift @ w^T, spread over rows (see _mac)
    sh2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    last = pid_k >= 0  # true: without a split, every program completes its tile
    if SPLIT_K:
        SPLIT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        # everything that does not depend on the previous kernel is loaded before the wait
        w1, w2, sc, sh = _slice_operands(w_ptr, cols1, cols2, ks, N1, N, K, scale_ptr, shift_ptr, NORM, PAIRED, BLOCK_K)
        _stage_wait(PDL, BAR, bar_ptr, nprog, err_ptr, wait_now)
        acc1, acc2, sq, sh1, sh2 = _mac(x_ptr, rows, ks, M, K, w1, w2, sc, sh, acc1, acc2, sq, sh1, sh2,
                                        NORM, PAIRED, IEEE, CG, BLOCK_M)
        sh1 = tl.sum(sh1, axis=0)
        sh2 = tl.sum(sh2, axis=0)
        if SPLIT > 1:
            # partials to the workspace: [SPLIT, M_PAD, N] sums, [SPLIT, M_PAD] squares, [SPLIT, N] shift @ w^T
            c1_ok = cols1 < N1
            c2_ok = cols2 < N
            at = ws_ptr + (pid_k * m_pad + rows)[:, None] * N
            tl.store(at + cols1[None, :], acc1, mask=c1_ok[None, :])
            if PAIRED:
                tl.store(at + cols2[None, :], acc2, mask=c2_ok[None, :])
            sq_ptr = ws_ptr + SPLIT * m_pad * N
            sh_ptr = sq_ptr + SPLIT * m_pad
            if NORM:  # every column tile writes the same squares of its rows: identical values, no race
                tl.store(sq_ptr + pid_k * m_pad + rows, sq)
                tl.store(sh_ptr + pid_k * N + cols1, sh1, mask=c1_ok)
                if PAIRED:
                    tl.store(sh_ptr + pid_k * N + cols2, sh2, mask=c2_ok)
            # all of the block's stores happen before its release of the tile's counter (as CUTLASS's split-K
            # semaphore: barrier, then one release at GPU scope)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            last = done == SPLIT - 1
            if last:  # every slice of this tile is in: sum them in slice order (the same bits every run)
                acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
                sh1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
                sh2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for s in tl.static_range(SPLIT):
                    at = ws_ptr + (s * m_pad + rows)[:, None] * N
                    acc1 += tl.load(at + cols1[None, :], mask=c1_ok[None, :], other=0.0, cache_modifier=".cg")
                    if PAIRED:
                        acc2 += tl.load(at + cols2[None, :], mask=c2_ok[None, :], other=0.0, cache_modifier=".cg")
                    if NORM:
                        sq += tl.load(sq_ptr + s * m_pad + rows, cache_modifier=".cg")
                        sh1 += tl.load(sh_ptr + s * N + cols1, mask=c1_ok, other=0.0, cache_modifier=".cg")
                        if PAIRED:
                            sh2 += tl.load(sh_ptr + s * N + cols2, mask=c2_ok, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch (and graph replay)
    else:
        _stage_wait(PDL, BAR, bar_ptr, nprog, err_ptr, wait_now)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            w1, w2, sc, sh = _slice_operands(w_ptr, cols1, cols2, ks, N1, N, K, scale_ptr, shift_ptr, NORM, PAIRED, BLOCK_K)
            acc1, acc2, sq, sh1, sh2 = _mac(x_ptr, rows, ks, M, K, w1, w2, sc, sh, acc1, acc2, sq, sh1, sh2,
                                            NORM, PAIRED, IEEE, CG, BLOCK_M)
        sh1 = tl.sum(sh1, axis=0)
        sh2 = tl.sum(sh2, axis=0)
    return acc1, acc2, sq, sh1, sh2, last


@triton.jit
def _normed(acc, sq, sh, w_scale_ptr, K: tl.constexpr, eps, W_FP8: tl.constexpr, dt: tl.constexpr):
    """The product's output rounded as F.linear rounds it: rstd * acc + shift @ w^T (NORM), times the FP8
    weight scale."""
    y = acc * tl.rsqrt(sq / K + eps)[:, None] + sh[None, :]
    if W_FP8:
        y = y * tl.load(w_scale_ptr)
    return _rnd(y, dt).to(tl.float32)


@triton.jit(do_not_specialize=["M"])  # one binary for 10 and 160 rows (M only masks)
def _qkv_rope_kernel(x_ptr, w_ptr, w_scale_ptr, scale_ptr, shift_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                     ws_ptr, cnt_ptr, M, N, K: tl.constexpr, T, KEYS, prefix_len, eps,
                     NQ: tl.constexpr, HD: tl.constexpr, W_FP8: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # program (pid_n, pid_k, pid_m): output columns d and d + HD/2 of one head (a RoPE pair), one K slice
    # (or all of K), rows of one block
    _qkv_rope_tile(x_ptr, w_ptr, w_scale_ptr, scale_ptr, shift_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, ws_ptr, cnt_ptr,
                   M, N, K, T, KEYS, prefix_len, eps, NQ, HD, W_FP8, IEEE, PDL, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
                   tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(2) * BLOCK_M,
                   False, cnt_ptr, 1, cnt_ptr, False, False)


@triton.jit
def _qkv_rope_tile(x_ptr, w_ptr, w_scale_ptr, scale_ptr, shift_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                   ws_ptr, cnt_ptr, M, N, K: tl.constexpr, T, KEYS, prefix_len, eps,
                   NQ: tl.constexpr, HD: tl.constexpr, W_FP8: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   pid_n, pid_k, pid_m, n_tiles, m_pad, BAR: tl.constexpr, bar_ptr, nprog, err_ptr, wait_now, CG: tl.constexpr):
    """Tile (pid_n, pid_k, pid_m) of q|k|v + RoPE (n_tiles column tiles, m_pad rows in the workspace)."""
    head = pid_n // (HD // 2 // BLOCK_N)  # 0..NQ-1: query heads, NQ: the k head, NQ + 1: the v head
    d = (pid_n % (HD // 2 // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)  # in [0, HD/2)
    cols1 = head * HD + d
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc1, acc2, sq, sh1, sh2, last = _product(x_ptr, w_ptr, ws_ptr, cnt_ptr, rows, cols1, cols1 + HD // 2, M, N, N, K,
                                              scale_ptr, shift_ptr, True, True, IEEE, PDL,
                                              BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, pid_k, pid_m * n_tiles + pid_n, m_pad,
                                              BAR, bar_ptr, nprog, err_ptr, wait_now, CG)
    if last:
        dt = q_ptr.dtype.element_ty
        y1 = _normed(acc1, sq, sh1, w_scale_ptr, K, eps, W_FP8, dt)
        y2 = _normed(acc2, sq, sh2, w_scale_ptr, K, eps, W_FP8, dt)
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
def _gated_residual_kernel(a_ptr, w_ptr, w_scale_ptr, res_ptr, gate_ptr, out_ptr, ws_ptr, cnt_ptr, M, N,
                           K: tl.constexpr, W_FP8: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """out = res + gate * (a @ w^T): the expert's gated residual after o_proj and down_proj."""
    _gated_residual_tile(a_ptr, w_ptr, w_scale_ptr, res_ptr, gate_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, W_FP8, IEEE, PDL,
                         BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, tl.program_id(0), tl.program_id(1), tl.program_id(2),
                         tl.num_programs(0), tl.num_programs(2) * BLOCK_M, False, cnt_ptr, 1, cnt_ptr, False, False)


@triton.jit
def _gated_residual_tile(a_ptr, w_ptr, w_scale_ptr, res_ptr, gate_ptr, out_ptr, ws_ptr, cnt_ptr, M, N,
                         K: tl.constexpr, W_FP8: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                         pid_n, pid_k, pid_m, n_tiles, m_pad, BAR: tl.constexpr, bar_ptr, nprog, err_ptr, wait_now, CG: tl.constexpr):
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc, _, _, _, _, last = _product(a_ptr, w_ptr, ws_ptr, cnt_ptr, rows, cols, cols, M, N, N, K, gate_ptr, gate_ptr,
                                     False, False, IEEE, PDL, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
                                     pid_k, pid_m * n_tiles + pid_n, m_pad, BAR, bar_ptr, nprog, err_ptr, wait_now, CG)
    if last:
        if W_FP8:
            acc = acc * tl.load(w_scale_ptr)
        dt = out_ptr.dtype.element_ty
        col_ok = cols < N
        ok = (rows[:, None] < M) & col_ok[None, :]
        gate = _rnd(tl.load(gate_ptr + cols, mask=col_ok, other=0.0), dt).to(tl.float32)
        res = _load_act(res_ptr + rows[:, None] * N + cols[None, :], ok, CG).to(tl.float32)
        gated = _rnd(_rnd(acc, dt).to(tl.float32) * gate[None, :], dt).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], _rnd(res + gated, dt), mask=ok)


@triton.jit(do_not_specialize=["M"])  # one binary for 10 and 160 rows (M only masks)
def _geglu_kernel(x_ptr, w_ptr, w_scale_ptr, scale_ptr, shift_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K: tl.constexpr,
                  eps, W_FP8: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, GELU_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """out (M, N // 2) = gelu_tanh(h @ Wg^T) * (h @ Wu^T), h = adaRMS(x); w = [Wg ; Wu] (N, K)."""
    _geglu_tile(x_ptr, w_ptr, w_scale_ptr, scale_ptr, shift_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, eps, W_FP8, IEEE, PDL,
                GELU_C, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, tl.program_id(0), tl.program_id(1), tl.program_id(2),
                tl.num_programs(0), tl.num_programs(2) * BLOCK_M, False, cnt_ptr, 1, cnt_ptr, False, False)


@triton.jit
def _geglu_tile(x_ptr, w_ptr, w_scale_ptr, scale_ptr, shift_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K: tl.constexpr,
                eps, W_FP8: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, GELU_C: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                pid_n, pid_k, pid_m, n_tiles, m_pad, BAR: tl.constexpr, bar_ptr, nprog, err_ptr, wait_now, CG: tl.constexpr):
    hidden = N // 2
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # gate column c pairs with up column hidden + c
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc_g, acc_u, sq, sh_g, sh_u, last = _product(x_ptr, w_ptr, ws_ptr, cnt_ptr, rows, cols, cols + hidden, M, hidden, N, K,
                                                  scale_ptr, shift_ptr, True, True, IEEE, PDL,
                                                  BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, pid_k, pid_m * n_tiles + pid_n,
                                                  m_pad, BAR, bar_ptr, nprog, err_ptr, wait_now, CG)
    if last:
        dt = out_ptr.dtype.element_ty
        g = _normed(acc_g, sq, sh_g, w_scale_ptr, K, eps, W_FP8, dt)
        u = _normed(acc_u, sq, sh_u, w_scale_ptr, K, eps, W_FP8, dt)
        z = GELU_C * (g + 0.044715 * g * g * g)
        tanh = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # tanh(z), saturating correctly for large |z|
        act = _rnd(0.5 * g * (1.0 + tanh), dt).to(tl.float32)
        ok = (rows[:, None] < M) & (cols[None, :] < hidden)
        tl.store(out_ptr + rows[:, None] * hidden + cols[None, :], _rnd(act * u, dt), mask=ok)


MASKED = -2.3819763e38  # openpi's big_neg, as the compile backend's key bias holds it
ATTN_BLOCK_Q, ATTN_BLOCK_S, ATTN_WARPS = 16, 64, 8  # 16 query rows x 64 keys per program: a (16, 256) fp32 accumulator


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, RB, S, R, own_start, own_end,
                      sm_scale, HD: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (pid_q, split, b): BLOCK_Q query rows of batch row b (RB = T * H rows each, all heads sharing
    the one K/V head) against the BLOCK_S keys of one split (flash-decoding). Each split leaves its row
    max, row sum of exp and unnormalized exp-weighted values in the workspace; the program that
    completes a query block merges the splits in order and writes the output. Keys outside
    [own_start, own_end) (the cached prefix and the padding) do not depend on the previous kernel: a
    split that holds none of the action tokens' own keys loads its K/V before the wait."""
    _attention_tile(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, RB, S, R, own_start, own_end, sm_scale, HD, IEEE,
                    PDL, BLOCK_Q, BLOCK_S, tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0),
                    tl.num_programs(1), False, cnt_ptr, 1, cnt_ptr, False, False)


@triton.jit
def _attention_tile(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, RB, S, R, own_start, own_end,
                    sm_scale, HD: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, pid_q, split, b, nq, nsplit, BAR: tl.constexpr, bar_ptr, nprog, err_ptr, wait_now, CG: tl.constexpr):
    d = tl.arange(0, HD)
    ks = split * BLOCK_S + tl.arange(0, BLOCK_S)
    k_ok = ks < S
    kv = (b * S + ks)[:, None] * HD + d[None, :]  # cache (B, S, HD)
    # clamped to openpi's finite big negative: a split whose keys are all masked then weighs exactly 0
    # in the merge even if a caller masked with -inf (exp(-inf - -inf) would be NaN)
    bias = tl.maximum(tl.load(bias_ptr + b * S + ks, mask=k_ok, other=-2.3819763e38), -2.3819763e38)
    own = (split * BLOCK_S < own_end) & (split * BLOCK_S + BLOCK_S > own_start)
    if own:
        _stage_wait(PDL, BAR, bar_ptr, nprog, err_ptr, wait_now)
        k = _load_act(k_ptr + kv, k_ok[:, None], CG)
        v = _load_act(v_ptr + kv, k_ok[:, None], CG)
    else:
        k = tl.load(k_ptr + kv, mask=k_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv, mask=k_ok[:, None], other=0.0)
        _stage_wait(PDL, BAR, bar_ptr, nprog, err_ptr, wait_now)
    qr = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = qr < RB
    rows = b * RB + qr  # rows of q (B * T * H, HD): row (b * T + t) * H + h
    q = _load_act(q_ptr + rows[:, None] * HD + d[None, :], q_ok[:, None], CG)
    dt = q_ptr.dtype.element_ty
    scores = _dot(q, k, tl.zeros((BLOCK_Q, BLOCK_S), dtype=tl.float32), IEEE)
    # as the eager attention: bf16 scores, then scaled and masked in fp32
    scores = _rnd(scores, dt).to(tl.float32) * sm_scale + bias[None, :]
    m = tl.max(scores, axis=1)
    p = tl.exp(scores - m[:, None])
    if IEEE:
        acc = tl.dot(_rnd(p, dt).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(p.to(dt), v)
    lsum = tl.sum(p, axis=1)
    # workspace: [nsplit, R] maxima, [nsplit, R] sums, [nsplit, R, HD] values
    l_ptr = ws_ptr + nsplit * R
    acc_ptr = l_ptr + nsplit * R
    ws = split * R + rows
    tl.store(ws_ptr + ws, m, mask=q_ok)
    tl.store(l_ptr + ws, lsum, mask=q_ok)
    tl.store(acc_ptr + ws[:, None] * HD + d[None, :], acc, mask=q_ok[:, None])
    tl.debug_barrier()
    tile = b * nq + pid_q
    done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if done == nsplit - 1:
        # out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s (M = max_s m_s); a split whose keys are all
        # masked has m_s ~ -2.4e38 and weighs exactly 0
        top = tl.load(ws_ptr + rows, mask=q_ok, other=0.0, cache_modifier=".cg")
        for sp in range(1, nsplit):
            top = tl.maximum(top, tl.load(ws_ptr + sp * R + rows, mask=q_ok, other=0.0, cache_modifier=".cg"))
        total = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        out = tl.zeros((BLOCK_Q, HD), dtype=tl.float32)
        for sp in range(0, nsplit):
            w = tl.exp(tl.load(ws_ptr + sp * R + rows, mask=q_ok, other=0.0, cache_modifier=".cg") - top)
            total += w * tl.load(l_ptr + sp * R + rows, mask=q_ok, other=1.0, cache_modifier=".cg")
            part = tl.load(acc_ptr + (sp * R + rows)[:, None] * HD + d[None, :], mask=q_ok[:, None], other=0.0,
                           cache_modifier=".cg")
            out += w[:, None] * part
        tl.store(out_ptr + rows[:, None] * HD + d[None, :], _rnd(out / total[:, None], out_ptr.dtype.element_ty),
                 mask=q_ok[:, None])
        tl.atomic_xchg(cnt_ptr + tile, 0)


def prune_configs(configs, named_args, **kwargs):
    """Autotune's early pruning: split-K shapes for one observation (at most SPLIT_ROWS rows), K-loop shapes
    for more rows (the split-K workspace would grow with the rows, and more rows already fill the GPU)."""
    m = kwargs.get("M", named_args.get("M") if isinstance(named_args, dict) else None)
    if m is None:
        return configs
    split = m <= SPLIT_ROWS
    return [c for c in configs if c.kwargs["SPLIT_K"] == split] or configs


_TUNED = {fn: triton.autotune(configs=CONFIGS, key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune_configs})(fn)
          for fn in (_qkv_rope_kernel, _gated_residual_kernel, _geglu_kernel)}


# ----- launchers --------------------------------------------------------------------------------------

def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or newer, and a Triton with `tl.extra.cuda.gdc_wait`."""
    if INTERPRET or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0) and hasattr(tl.extra.cuda, "gdc_wait")


class Scratch:
    """The split-K partial sums and the per-tile counters of the last-program reductions, per device: one
    fp32 workspace and one int32 counter buffer (zeros; each reduction puts its counters back to zero).
    Kernels on one stream use them one after another (with PDL, only after their wait). A buffer is never
    freed or reallocated in place: a CUDA graph keeps the addresses it was captured with, so a larger
    need gets a new buffer and the old one stays alive for the graphs that use it."""

    def __init__(self):
        self._buffers: dict = {}
        self._retired: list = []

    def get(self, device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        ws, cnt = self._buffers.get(device, (None, None))
        if ws is None or ws.numel() < floats or cnt.numel() < tiles:
            if ws is not None:
                self._retired.append((ws, cnt))
            ws = torch.empty(max(floats, 1, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
            cnt = torch.zeros(max(tiles, 1, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
            self._buffers[device] = (ws, cnt)
        return ws, cnt


DEFAULT_SCRATCH = Scratch()  # for direct calls of the launchers; one stream at a time (ExpertKernels has its own)
use_pdl = True  # False: plain launches (for A/B timing: scripts/gpu/expert_step_bench.py)
_PDL_BROKEN: list[str] = []  # the error of a first failed PDL launch; later launches go without PDL


def product_workspace(split: int, m_pad: int, n: int) -> int:
    """Floats of a split-K product's workspace as `_product` lays it out: [split, m_pad, n] partial sums,
    [split, m_pad] sums of squares, [split, n] shift @ w^T."""
    return split * (m_pad * n + m_pad + n)


def attention_workspace(nsplit: int, rows: int, hd: int) -> int:
    """Floats of the split-key attention's workspace as `_attention_tile` lays it out: [nsplit, rows] maxima,
    [nsplit, rows] sums, [nsplit, rows, hd] values."""
    return nsplit * rows * (hd + 2)


def _product_scratch(scratch: Scratch, device, m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Room for the largest split any configuration makes of an (m, n, k) product."""
    if m > SPLIT_ROWS:
        return scratch.get(device, 1, 1)
    split, m_pad = triton.cdiv(k, SLICE_K), triton.cdiv(SPLIT_ROWS, SPLIT_BLOCK_M) * SPLIT_BLOCK_M  # rows as padded
    return scratch.get(device, product_workspace(split, m_pad, n), n)  # tiles <= n column blocks of >= 1


def _with_pdl(device, launch) -> None:
    """launch(pdl) with programmatic dependent launch where the GPU and Triton have it; if such a launch
    fails where a plain one works (an older driver or Triton), this and every later launch go without it.
    If the plain launch fails too, its error propagates and PDL stays on."""
    if use_pdl and pdl_supported(device) and not _PDL_BROKEN:
        try:
            launch(True)
            return
        except Exception as exc:
            launch(False)  # fails too (a kernel that does not build, bad arguments): that error, PDL kept
            _PDL_BROKEN.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            log.warning("programmatic dependent launch failed (%s); launching the expert kernels without it", _PDL_BROKEN[0])
            return
    launch(False)


def _launch(fn, grid_fn, args: dict, m: int, pair_width: int | None):
    """Autotuned on a GPU; in the interpreter, the smallest blocks that fit (it runs programs one by one)."""
    if INTERPRET:
        blocks = {"BLOCK_M": INTERPRETER_BLOCKS["BLOCK_M"] * (1 if m <= SPLIT_ROWS else 2),
                  "BLOCK_N": min(INTERPRETER_BLOCKS["BLOCK_N"], pair_width or 16),
                  "BLOCK_K": INTERPRETER_BLOCKS["BLOCK_K"], "SPLIT_K": m <= SPLIT_ROWS}
        fn[grid_fn(blocks)](**args, PDL=False, **blocks)
        return
    device = args["w_ptr"].device
    _with_pdl(device, lambda pdl: _TUNED[fn][grid_fn](**args, PDL=pdl, **({"launch_pdl": True} if pdl else {})))


def _unpack(w):
    """(matrix, scale tensor or None): bf16/fp32 weights, or the fp8 backend's Fp8Matrix (w8, w_scale, x_scale)."""
    if isinstance(w, tuple):
        return w[0], w[1]
    return w, None


def _common(a: torch.Tensor, w, scratch: Scratch | None) -> dict:
    mat, scale = _unpack(w)
    if not (a.is_contiguous() and mat.is_contiguous()):
        raise ValueError("expert kernels need contiguous activations and weights")
    if mat.shape[1] != a.shape[1]:
        raise ValueError(f"weight {tuple(mat.shape)} does not take inputs of width {a.shape[1]}")
    m, n, k = a.shape[0], mat.shape[0], a.shape[1]
    ws, cnt = _product_scratch(scratch or DEFAULT_SCRATCH, a.device, m, n, k)
    return {"w_ptr": mat, "w_scale_ptr": mat if scale is None else scale, "ws_ptr": ws, "cnt_ptr": cnt,
            "M": m, "N": n, "K": k, "W_FP8": scale is not None, "IEEE": a.dtype == torch.float32 or INTERPRET}


def _grid(n_tiles, m: int, k: int):
    """(column tiles, K slices, row blocks) for a configuration's meta-parameters."""
    return lambda meta: (n_tiles(meta), triton.cdiv(k, meta["BLOCK_K"]) if meta["SPLIT_K"] else 1,
                         triton.cdiv(m, meta["BLOCK_M"]))


def qkv_rope(x, w, scale, shift, cos, sin, q, k_cache, v_cache, prefix_len: int, heads: int, eps: float, *,
             scratch: Scratch | None = None) -> None:
    """x (B, T, width) -> q (B * T, H * hd); k, v into k_cache/v_cache (B, KEYS, hd)[:, prefix_len:prefix_len + T]."""
    b, t, width = x.shape
    hd = k_cache.shape[-1]
    x2 = x.reshape(b * t, width)  # (M, width), row m = b * T + t
    args = _common(x2, w, scratch)
    widest = WIDEST_N if not INTERPRET else min(INTERPRETER_BLOCKS["BLOCK_N"], hd // 2)
    if args["N"] != (heads + 2) * hd or (hd // 2) % widest:
        raise ValueError(f"qkv of {args['N']} rows and head_dim {hd} do not fit {heads} + 2 heads of RoPE pairs")
    for buf in (cos, sin, q, k_cache, v_cache):
        if not buf.is_contiguous():
            raise ValueError("expert kernels need contiguous cos/sin, q and cache buffers")
    args.update(x_ptr=x2, scale_ptr=scale, shift_ptr=shift, cos_ptr=cos, sin_ptr=sin, q_ptr=q, k_ptr=k_cache,
                v_ptr=v_cache, T=t, KEYS=k_cache.shape[1], prefix_len=prefix_len, eps=eps, NQ=heads, HD=hd)
    grid = _grid(lambda meta: (heads + 2) * (hd // 2 // meta["BLOCK_N"]), b * t, width)
    _launch(_qkv_rope_kernel, grid, args, b * t, hd // 2)


def gated_residual(a, w, res, gate, out, *, scratch: Scratch | None = None) -> None:
    """out (M, N) = res + gate * (a (M, K) @ w^T)."""
    args = _common(a, w, scratch)
    args.update(a_ptr=a, res_ptr=res, gate_ptr=gate, out_ptr=out)
    grid = _grid(lambda meta: triton.cdiv(args["N"], meta["BLOCK_N"]), args["M"], args["K"])
    _launch(_gated_residual_kernel, grid, args, args["M"], None)


def geglu(x, w, scale, shift, out, eps: float, *, scratch: Scratch | None = None) -> None:
    """out (M, mlp) = gelu_tanh(h @ Wg^T) * (h @ Wu^T), h = adaRMS(x (M, width)); w = [Wg ; Wu]."""
    args = _common(x, w, scratch)
    hidden = args["N"] // 2
    args.update(x_ptr=x, scale_ptr=scale, shift_ptr=shift, out_ptr=out, eps=eps, GELU_C=GELU_C)
    grid = _grid(lambda meta: triton.cdiv(hidden, meta["BLOCK_N"]), args["M"], args["K"])
    _launch(_geglu_kernel, grid, args, args["M"], hidden)


def attention(q, k_cache, v_cache, bias, out, own: tuple[int, int] | None = None, *,
              scratch: Scratch | None = None) -> None:
    """out (B * T * H, hd) = softmax(q k^T / sqrt(hd) + bias) v for q (B, T * H, hd) over the cache
    (B, S, hd) (one K/V head for all heads), bias (B, 1, S) fp32: one split-key kernel that merges its
    splits. `own` = (start, end): the cache rows the previous kernel writes (the action tokens' K/V);
    None: all of them (no K/V prefetched before the wait)."""
    b, rb, hd = q.shape
    s = k_cache.shape[1]
    for t in (q, k_cache, v_cache, bias, out):
        if not t.is_contiguous():
            raise ValueError("the expert attention kernel needs contiguous q, cache, bias and output")
    if bias.shape != (b, 1, s) or bias.dtype != torch.float32 or hd & (hd - 1):
        raise ValueError(f"attention needs a (B, 1, S) fp32 bias and a power-of-two head_dim, got {tuple(bias.shape)}, {hd}")
    r, nsplit, qblocks = b * rb, triton.cdiv(s, ATTN_BLOCK_S), triton.cdiv(rb, ATTN_BLOCK_Q)
    own_start, own_end = own if own is not None else (0, s)
    ws, cnt = (scratch or DEFAULT_SCRATCH).get(q.device, attention_workspace(nsplit, r, hd), qblocks * b)
    ieee = q.dtype == torch.float32 or INTERPRET
    _with_pdl(q.device, lambda pdl: _attention_kernel[(qblocks, nsplit, b)](
        q, k_cache, v_cache, bias, out, ws, cnt, rb, s, r, own_start, own_end, hd ** -0.5,
        HD=hd, IEEE=ieee, PDL=pdl, BLOCK_Q=ATTN_BLOCK_Q, BLOCK_S=ATTN_BLOCK_S, num_warps=ATTN_WARPS,
        **({"launch_pdl": True} if pdl else {})))


# ----- the same fusions in torch (the reference each kernel is checked against, and the fallback) ---

def _linear(h, w):
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
    y = _linear(_modulate(x.reshape(b * t, width), scale, shift, eps), w).float()  # (M, (H + 2) hd)
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
    out.copy_(res + _linear(a, w) * gate.to(dt))


def geglu_reference(x, w, scale, shift, out, eps: float) -> None:
    g, u = _linear(_modulate(x, scale, shift, eps), w).chunk(2, dim=-1)
    out.copy_(F.gelu(g, approximate="tanh") * u)


def attention_reference(q, k_cache, v_cache, bias, out, own=None) -> None:
    """The compile backend's attention (bf16 scores, fp32 softmax, bf16 probabilities); `own` (which rows
    the kernel may not prefetch) does not change the result."""
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
    split-key attention kernel here. Each instance has its own `Scratch` (workspace and counters), so
    two samplers never share one.

    `status` maps "product@M" (qkv_rope, attention, o_residual, geglu, down_residual) to "ok: ..." or "fallback: ..." once each kernel has run at M rows."""

    def __init__(self, heads: int, eps: float, attention, check_tol: float = 3e-2):
        self.heads, self.eps, self.attention = heads, eps, attention
        self.check_tol = check_tol
        self.status: dict[str, str] = {}
        self.scratch = Scratch()

    def _agrees(self, got, want) -> tuple[bool, str]:
        err = float((got.float() - want.float()).abs().max())
        scale = float(want.float().abs().max())
        ok = math.isfinite(err) and err <= self.check_tol * scale + 1e-5
        return ok, f"max |triton - torch| {err:.2e} (|torch| max {scale:.2e})"

    def _run(self, name: str, label: str, m: int, args: tuple, outputs) -> None:
        """Run kernel `name` (as `label`); on its first call at M rows, check it against its torch reference."""
        fused, reference = KERNELS[name]
        kernel = functools.partial(fused, scratch=self.scratch)
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
        checks = [self._agrees(g, w) for g, w in zip(got, outputs())]
        ok, note = all(c[0] for c in checks), max(checks, key=lambda c: not c[0])[1]
        if ok:
            self.status[key] = f"ok: {note}"
            kernel(*args)  # leave the kernel's own results in the outputs
        else:
            self.status[key] = f"fallback: mismatch, {note}"
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
            own = (prefix_len, prefix_len + t)  # the cache rows qkv_rope just wrote
            self._run("attention", "attention", m, (q.view(b, t * heads, hd), k_cache, v_cache, bias, attn, own),
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


def reference_stack(x, mods, cos, sin, bias, ks, vs, weights, prefix_len: int, *, heads: int, eps: float):
    """A step's expert layers through the torch references of the fused kernels (what the step kernel is
    checked against)."""
    b, t, width = x.shape
    m, hd = b * t, ks[0].shape[-1]
    x = x.reshape(m, width)
    for i, w in enumerate(weights):
        q = x.new_empty(m, heads * hd)
        qkv_rope_reference(x.view(b, t, width), w.qkv, mods[i, 0], mods[i, 1], cos, sin, q, ks[i], vs[i], prefix_len, heads, eps)
        attn = x.new_empty(m * heads, hd)
        attention_reference(q.view(b, t * heads, hd), ks[i], vs[i], bias, attn)
        x1 = x.new_empty(m, width)
        gated_residual_reference(attn.view(m, heads * hd), w.o, x, mods[i, 2], x1)
        hidden = x.new_empty(m, _unpack(w.down)[0].shape[1])
        geglu_reference(x1, w.gate_up, mods[i, 3], mods[i, 4], hidden, eps)
        x = x.new_empty(m, width)
        gated_residual_reference(hidden, w.down, x1, mods[i, 5], x)
    return x.view(b, t, width)
