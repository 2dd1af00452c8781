"""The whole denoising step's action-expert layers as ONE persistent Triton kernel (one observation).

Why: the per-layer kernels (policy/backends/expert_triton.py) bring a layer to ~39 us on an H200 against
~8 us for its weights: five dependent kernels, each paying a launch and a chain of memory round trips
(README's Performance section). Here one launch runs all 18 layers: one program per SM, each looping
over the layers and, per layer, over five stages:

  Q  q|k|v + RoPE (adaRMS folded in)       A  attention over [prefix K/V ; own K/V]
  O  x1 = x + gate1 * (attn @ Wo^T)        G  gelu_tanh(h @ Wg^T) * (h @ Wu^T), h = adaRMS(x1)
  D  x2 = x1 + gate2 * (hidden @ Wd^T)

A stage's work items (split-K tiles of a product, query-block x key-split tiles of the attention) go
round-robin over the programs; each item is exactly the per-layer kernels' tile (the same @triton.jit
bodies: one home for the maths), its reduction by the program that completes the tile included.

Between stages, a split-phase grid barrier: a program arrives (one release atomic on the stage's
counter, after its stores) when its items are done, and waits (spins until every program has arrived,
then acquires) only before its first item of the next stage reads them, AFTER issuing that item's weight
loads. So weights stream while the barrier settles (what programmatic dependent launch did between
kernels, now without launches), and a program with no item in a stage goes straight on to prefetch the
next. Every counter is reset in the same launch (the last program to arrive at barrier b resets b - 1;
the last barrier resets itself), so a CUDA graph replays it as is. A barrier that spins for seconds
(programs not co-resident: more programs than fit, two step kernels at once, a GPU shared with other
work) gives up and raises a sticky error flag instead of hanging; every later wait then gives up at once,
the launch's output is NaN, and so is every later launch's of that launcher (`ExpertStep.failed()`
says why; the counters are zeroed before each launch).

Deadlock freedom needs every program resident at once: one program per SM (the grid is the SM count)
and one program fits an SM whenever the kernel launches at all.

Weights and caches as the kernel takes them: each kind's 18 matrices in one (depth, N, K) tensor and the
KV cache in one (depth, B, KEYS, hd) tensor, found from the per-layer tensors when they are evenly spaced
views of one storage (`stacked_view`); `stack_layers` makes the samplers' expert weights so (no copy
kept). Anything else runs the per-layer kernels.

In Triton's interpreter (CI) the same kernel runs as ONE program, which then does every item of every
stage in order and passes each barrier at once: that checks all of the maths on the CPU, the split-K
reductions included; the barriers' memory ordering is the GPU tests' job (tests/test_gpu.py).

References: CUDA cooperative groups' grid sync (arrive, spin, fence) for the barrier; "Hazy Research,
Look Ma, No Bubbles! (2025)" for why one persistent kernel per forward pass beats a chain of small ones.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from policy.backends import expert_triton as et
from policy.backends.fused import ExpertWeights

log = logging.getLogger(__name__)

STAGES = 5  # Q, A, O, G, D: barrier counters per layer
SCALE_STRIDE = 4  # floats between two layers' FP8 weight scales (16 bytes)
WARPS = 8
BLOCK_M = 16  # rows: one observation (10 action tokens) padded to the tensor-core tile
MAX_ROWS = BLOCK_M
WIDTHS = {"Q": 64, "O": 32, "G": 64, "D": 32}  # output columns of a tile per stage on a GPU (G: gate and up each)
# the longest K slice per stage that compiles without register spills at WARPS warps (ptxas 12.8, Triton
# 3.6, sm_90: the adaRMS-folded, paired q|k|v and gate|up tiles need about twice the registers of a plain one)
MAX_BK = {"Q": 256, "G": 256, "O": 1024, "D": 1024}
PROGRAMS = None  # at most this many programs (None: one per SM)
NOMINAL_PROGRAMS = 32  # the interpreter runs one program but sizes the split-K tiles as if for this many


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def stage_blocks(width: int, mlp: int, heads: int, hd: int, programs: int, widths: dict | None = None,
                 max_bk: dict | None = None) -> dict:
    """Per product stage (Q, O, G, D): the tile width BLOCK_N (WIDTHS; q|k|v tiles hold RoPE pairs, at most
    head_dim / 2), the K slice BLOCK_K: no longer than the stage's MAX_BK (what fits the registers without
    spilling), and more K slices (a power of two) while the items stay within one per program."""
    widths, max_bk = WIDTHS if widths is None else widths, MAX_BK if max_bk is None else max_bk
    stages = {  # name: (output columns (RoPE pairs, gate/up pairs), K, tile width)
        "Q": ((heads + 2) * (hd // 2), width, min(widths["Q"], hd // 2)),
        "O": (width, heads * hd, widths["O"]),
        "G": (mlp, width, widths["G"]),
        "D": (width, mlp, widths["D"]),
    }
    out = {}
    for name, (cols, k, bn) in stages.items():
        tiles = triton.cdiv(cols, bn)
        split = 1
        while _pow2_at_least(triton.cdiv(k, split)) > max_bk.get(name, k):
            split *= 2
        while tiles * split * 2 <= programs and triton.cdiv(k, split * 2) >= 16:
            split *= 2
        out[f"{name}_BN"], out[f"{name}_BK"] = bn, _pow2_at_least(triton.cdiv(k, split))
    return out


@triton.jit
def _arrive(bar_ptr, idx, last_idx, nprog, trace_ptr, TRACE: tl.constexpr):
    """This program's stores of a stage are done: release them on barrier counter idx. The last program to
    arrive resets counter idx - 1 (everyone has passed its wait: they all got here), and the last
    barrier resets itself (nobody waits on it). TRACE: record the time of arrival."""
    tl.debug_barrier()
    if TRACE:
        tl.store(trace_ptr + tl.program_id(0) * (last_idx + 1) + idx, et.now_ns())
    old = tl.atomic_add(bar_ptr + idx, 1, sem="release", scope="gpu")
    if old == nprog - 1:
        if idx > 0:
            tl.atomic_xchg(bar_ptr + idx - 1, 0)
        if idx == last_idx:
            tl.atomic_xchg(bar_ptr + idx, 0)


@triton.jit
def _gated_residual_stage(a_ptr, w_ptr, s_ptr, res_ptr, gate_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K: tl.constexpr,
                          W_FP8: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, BAR: tl.constexpr, wait_ptr, err_ptr):
    """Stage O or D: this program's items of out = res + gate * (a @ w^T), the first after barrier wait_ptr."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    SPLIT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    for item in range(pid, TILES * SPLIT, nprog):
        et._gated_residual_tile(a_ptr, w_ptr, s_ptr, res_ptr, gate_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, W_FP8, IEEE, False,
                                BLOCK_M, BLOCK_N, BLOCK_K, True, item // SPLIT, item % SPLIT, 0, TILES, BLOCK_M,
                                BAR, wait_ptr, nprog, err_ptr, item == pid, True)


@triton.jit
def _step_kernel(x_ptr, out_ptr, x1_ptr, q_ptr, attn_ptr, hid_ptr,
                 wqkv_ptr, wo_ptr, wgu_ptr, wd_ptr, sqkv_ptr, so_ptr, sgu_ptr, sd_ptr,
                 mods_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, bias_ptr, ws_ptr, cnt_ptr, bar_ptr, err_ptr, trace_ptr,
                 M, T, KEYS, prefix_len, eps, sm_scale, s_stride,
                 DEPTH: tl.constexpr, WIDTH: tl.constexpr, MLP: tl.constexpr, NQ: tl.constexpr, HD: tl.constexpr,
                 F8_QKV: tl.constexpr, F8_O: tl.constexpr, F8_GU: tl.constexpr, F8_D: tl.constexpr,
                 IEEE: tl.constexpr, GELU_C: tl.constexpr, BLOCK_M: tl.constexpr,
                 Q_BN: tl.constexpr, Q_BK: tl.constexpr, O_BN: tl.constexpr, O_BK: tl.constexpr,
                 G_BN: tl.constexpr, G_BK: tl.constexpr, D_BN: tl.constexpr, D_BK: tl.constexpr,
                 ATT_BQ: tl.constexpr, ATT_BS: tl.constexpr, BAR: tl.constexpr,
                 TRACE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NQKV: tl.constexpr = (NQ + 2) * HD
    ATT: tl.constexpr = NQ * HD
    Q_TILES: tl.constexpr = (NQ + 2) * (HD // 2 // Q_BN)
    Q_SPLIT: tl.constexpr = (WIDTH + Q_BK - 1) // Q_BK
    G_TILES: tl.constexpr = (MLP + G_BN - 1) // G_BN
    G_SPLIT: tl.constexpr = (WIDTH + G_BK - 1) // G_BK
    batch = M // T
    rb = T * NQ  # query rows per batch row: (token, head)
    nq = (rb + ATT_BQ - 1) // ATT_BQ
    nsplit = (KEYS + ATT_BS - 1) // ATT_BS
    last_bar = DEPTH * 5 - 1
    for layer in range(DEPTH):
        lw = tl.cast(layer, tl.int64)
        src = tl.where(layer == 0, x_ptr, out_ptr)  # the layer's input: the step's, then the last layer's x2
        mods = mods_ptr + layer * 6 * WIDTH
        k_l = k_ptr + lw * batch * KEYS * HD
        v_l = v_ptr + lw * batch * KEYS * HD
        bar = layer * 5  # this layer's barriers: bar + 0 (Q done) .. bar + 4 (D done)
        # Q: waits for the previous layer's D (the first layer's input is ready at launch)
        for item in range(pid, Q_TILES * Q_SPLIT, nprog):
            et._qkv_rope_tile(src, wqkv_ptr + lw * NQKV * WIDTH, sqkv_ptr + layer * s_stride, mods, mods + WIDTH, cos_ptr,
                              sin_ptr, q_ptr, k_l, v_l, ws_ptr, cnt_ptr, M, NQKV, WIDTH, T, KEYS, prefix_len, eps, NQ, HD,
                              F8_QKV, IEEE, False, BLOCK_M, Q_BN, Q_BK, True, item // Q_SPLIT, item % Q_SPLIT, 0, Q_TILES,
                              BLOCK_M, BAR, bar_ptr + bar - 1, nprog, err_ptr, (item == pid) & (layer > 0), True)
        _arrive(bar_ptr, bar, last_bar, nprog, trace_ptr, TRACE)
        # A: q and the own K/V from Q
        for item in range(pid, batch * nq * nsplit, nprog):
            b = item // (nq * nsplit)
            rest = item % (nq * nsplit)
            et._attention_tile(q_ptr, k_l, v_l, bias_ptr, attn_ptr, ws_ptr, cnt_ptr, rb, KEYS, M * NQ, prefix_len,
                               prefix_len + T, sm_scale, HD, IEEE, False, ATT_BQ, ATT_BS, rest // nsplit, rest % nsplit, b,
                               nq, nsplit, BAR, bar_ptr + bar, nprog, err_ptr, item == pid, True)
        _arrive(bar_ptr, bar + 1, last_bar, nprog, trace_ptr, TRACE)
        # O: x1 = x + gate1 * (attn @ Wo^T)
        _gated_residual_stage(attn_ptr, wo_ptr + lw * WIDTH * ATT, so_ptr + layer * s_stride, src, mods + 2 * WIDTH, x1_ptr,
                              ws_ptr, cnt_ptr, M, WIDTH, ATT, F8_O, IEEE, BLOCK_M, O_BN, O_BK, BAR, bar_ptr + bar + 1, err_ptr)
        _arrive(bar_ptr, bar + 2, last_bar, nprog, trace_ptr, TRACE)
        # G: hidden = gelu(h Wg^T) * (h Wu^T), h = adaRMS(x1)
        for item in range(pid, G_TILES * G_SPLIT, nprog):
            et._geglu_tile(x1_ptr, wgu_ptr + lw * 2 * MLP * WIDTH, sgu_ptr + layer * s_stride, mods + 3 * WIDTH,
                           mods + 4 * WIDTH, hid_ptr, ws_ptr, cnt_ptr, M, 2 * MLP, WIDTH, eps, F8_GU, IEEE, False, GELU_C,
                           BLOCK_M, G_BN, G_BK, True, item // G_SPLIT, item % G_SPLIT, 0, G_TILES, BLOCK_M,
                           BAR, bar_ptr + bar + 2, nprog, err_ptr, item == pid, True)
        _arrive(bar_ptr, bar + 3, last_bar, nprog, trace_ptr, TRACE)
        # D: x2 = x1 + gate2 * (hidden @ Wd^T), into out (the next layer's input)
        _gated_residual_stage(hid_ptr, wd_ptr + lw * WIDTH * MLP, sd_ptr + layer * s_stride, x1_ptr, mods + 5 * WIDTH, out_ptr,
                              ws_ptr, cnt_ptr, M, WIDTH, MLP, F8_D, IEEE, BLOCK_M, D_BN, D_BK, BAR, bar_ptr + bar + 3, err_ptr)
        _arrive(bar_ptr, bar + 4, last_bar, nprog, trace_ptr, TRACE)


# ----- stacked weights and caches ---------------------------------------------------------------------

def stacked_view(tensors) -> torch.Tensor | None:
    """The (n, *shape) tensor whose [i] is tensors[i], if they are consecutive views of one storage with one
    shape, dtype and contiguous layout, one right after the other (the kernel assumes that); else None."""
    first = tensors[0]
    if not all(isinstance(t, torch.Tensor) for t in tensors) or not first.is_contiguous():
        return None
    if any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
           or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for t in tensors):
        return None
    offsets = [t.storage_offset() for t in tensors]
    step = first.numel()  # dense: the kernel steps from one layer to the next by the tensor's size
    if any(b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), offsets[0])


def stack_layers(layers: list[ExpertWeights]) -> list[ExpertWeights]:
    """The same weights as views of one (depth, N, K) tensor per kind (and one (depth,) tensor of FP8 scales),
    as the step kernel takes them; the per-layer tensors are not kept."""
    out = {}
    for name in ExpertWeights._fields:
        mats = [getattr(lw, name) for lw in layers]
        if isinstance(mats[0], tuple):  # Fp8Matrix: stack w8 and the scales
            w8 = torch.stack([m.w8 for m in mats])
            # one scale per 16 bytes: cuBLASLt's FP8 products (torch._scaled_mm) reject a scale pointer that is
            # not 16-byte aligned, and the layer views are what they get
            ws = torch.zeros(len(mats), SCALE_STRIDE, dtype=torch.float32, device=w8.device)
            ws[:, 0] = torch.stack([m.w_scale.reshape(()).float() for m in mats])
            out[name] = [m._replace(w8=w8[i], w_scale=ws[i, 0]) for i, m in enumerate(mats)]
        else:
            stack = torch.stack(mats)
            out[name] = list(stack.unbind(0))
    return [ExpertWeights(**{k: out[k][i] for k in ExpertWeights._fields}) for i in range(len(layers))]


def _scales_view(scales) -> torch.Tensor | None:
    """The (depth,) view, strided by SCALE_STRIDE, of per-layer FP8 scales laid out as `stack_layers` does."""
    first = scales[0]
    if any(s.dim() != 0 or s.dtype != torch.float32 or s.device != first.device
           or s.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for s in scales):
        return None
    if any(s.storage_offset() - first.storage_offset() != i * SCALE_STRIDE for i, s in enumerate(scales)):
        return None
    return first.as_strided((len(scales),), (SCALE_STRIDE,), first.storage_offset())


def _kind(mats) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(depth, N, K) matrices and their (depth,) FP8 scales (None for bf16/fp32), if stacked."""
    if isinstance(mats[0], tuple):
        w, s = stacked_view([m[0] for m in mats]), _scales_view([m[1] for m in mats])
        return None if w is None or s is None else (w, s)
    w = stacked_view(mats)
    return None if w is None else (w, None)


class ExpertStep:
    """Launcher of the step kernel for one sampler (its own workspace, counters and error flag)."""

    def __init__(self, heads: int, eps: float):
        self.heads, self.eps = heads, eps
        self.scratch = et.Scratch()
        self._flags: dict = {}
        self.sleep_between_polls = True  # False: spin (A/B in scripts/gpu/expert_step_bench.py)
        self.trace: torch.Tensor | None = None  # (programs, depth * STAGES) int64: arrival times in ns, if given

    @staticmethod
    def programs(device: torch.device) -> int:
        """One program per SM (at most PROGRAMS, when set); one in the interpreter."""
        if et.INTERPRET or device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return min(sms, PROGRAMS or sms)

    def supports(self, x, ks, vs, weights) -> bool:
        """One observation (at most MAX_ROWS rows) with stacked weights and caches."""
        b, t, _ = x.shape
        if b * t > MAX_ROWS or not x.is_contiguous():
            return False
        if stacked_view(ks) is None or stacked_view(vs) is None:
            return False
        hd = ks[0].shape[-1]
        if hd & (hd - 1) or hd < 2:  # power of two: then a power-of-two tile of at most hd / 2 divides hd / 2
            return False
        return all(_kind([getattr(lw, name) for lw in weights]) is not None for name in ExpertWeights._fields)

    def failed(self, device: torch.device) -> bool:
        """Whether a barrier of any launch so far gave up (reads the flag: a device sync)."""
        flag = self._flags.get(device)
        return bool(flag is not None and int(flag.item()))

    def __call__(self, x, mods, cos, sin, bias, ks, vs, weights, prefix_len: int) -> torch.Tensor:
        """All expert layers of one step: x (B, T, width) -> (B, T, width); mods (depth, 6, width) fp32."""
        b, t, width = x.shape
        m, hd, heads, depth = b * t, ks[0].shape[-1], self.heads, len(weights)
        k_all, v_all = stacked_view(ks), stacked_view(vs)
        kinds = {name: _kind([getattr(lw, name) for lw in weights]) for name in ExpertWeights._fields}
        mlp = kinds["down"][0].shape[2]
        keys = k_all.shape[2]
        if mods.shape != (depth, 6, width) or not mods.is_contiguous() or mods.dtype != torch.float32:
            raise ValueError(f"the step kernel needs contiguous fp32 mods of shape {(depth, 6, width)}, got {tuple(mods.shape)}")
        if prefix_len < 0 or prefix_len + t > keys:
            raise ValueError(f"the action tokens' K/V rows {prefix_len}..{prefix_len + t} do not fit a cache of {keys} keys")
        if bias.shape != (b, 1, keys) or bias.dtype != torch.float32:
            raise ValueError(f"the step kernel needs a ({b}, 1, {keys}) fp32 key bias, got {tuple(bias.shape)} {bias.dtype}")
        for buf in (cos, sin):
            if buf.shape != (b, t, hd) or buf.dtype != x.dtype:
                raise ValueError(f"the step kernel needs cos/sin of shape {(b, t, hd)} in {x.dtype}, got {tuple(buf.shape)} {buf.dtype}")
        for buf in (cos, sin, bias):
            if not buf.is_contiguous():
                raise ValueError("the step kernel needs contiguous cos/sin and bias")
        dev = x.device
        nprog = self.programs(dev)
        if et.INTERPRET:  # one program, tiles sized as for NOMINAL_PROGRAMS, at most the interpreter's widths
            narrow = {k: min(v, et.INTERPRETER_BLOCKS["BLOCK_N"]) for k, v in WIDTHS.items()}
            blocks = stage_blocks(width, mlp, heads, hd, NOMINAL_PROGRAMS, narrow, {})
        else:
            blocks = stage_blocks(width, mlp, heads, hd, nprog)
        att_bq, att_bs = (et.INTERPRETER_BLOCKS["BLOCK_M"], 32) if et.INTERPRET else (et.ATTN_BLOCK_Q, et.ATTN_BLOCK_S)
        nq, nsplit = triton.cdiv(t * heads, att_bq), triton.cdiv(keys, att_bs)
        # workspace: the largest split-K partials of a stage, or the attention's per-split statistics
        floats, tiles = et.attention_workspace(nsplit, m * heads, hd), b * nq
        for name, (n, k) in {"Q": ((heads + 2) * hd, width), "O": (width, heads * hd), "G": (2 * mlp, width),
                             "D": (width, mlp)}.items():
            split = triton.cdiv(k, blocks[f"{name}_BK"])
            floats = max(floats, et.product_workspace(split, BLOCK_M, n))
            tiles = max(tiles, triton.cdiv(n, blocks[f"{name}_BN"]))
        nbar = depth * STAGES
        ws, cnt = self.scratch.get(dev, floats, tiles + nbar + 1)
        counters, bars, err = cnt[:tiles], cnt[tiles:tiles + nbar], cnt[tiles + nbar:tiles + nbar + 1]
        self._flags[dev] = err
        x1, out = x.new_empty(m, width), x.new_empty(b, t, width)
        q = x.new_empty(m, heads * hd)
        attn, hidden = x.new_empty(m * heads, hd), x.new_empty(m, mlp)
        mats = {name: kinds[name][0] for name in kinds}
        scales = {name: kinds[name][1] if kinds[name][1] is not None else mods for name in kinds}  # unused if bf16
        strides = {kinds[name][1].stride(0) for name in kinds if kinds[name][1] is not None} or {0}
        if len(strides) > 1:
            raise ValueError(f"the FP8 scales of the expert's matrices are laid out differently: strides {strides}")
        trace = self.trace
        if trace is not None and (trace.shape != (nprog, nbar) or trace.dtype != torch.int64 or trace.device != dev):
            raise ValueError(f"the trace buffer must be ({nprog}, {nbar}) int64 on {dev}, got {tuple(trace.shape)} "
                             f"{trace.dtype} on {trace.device}")
        trace = None if et.INTERPRET else trace  # no timer in the interpreter
        # every counter from zero, whatever an earlier launch left (one that gave up leaves them dirty); the
        # error flag is sticky
        cnt[:tiles + nbar].zero_()
        _step_kernel[(nprog,)](
            x, out, x1, q, attn, hidden, mats["qkv"], mats["o"], mats["gate_up"], mats["down"],
            scales["qkv"], scales["o"], scales["gate_up"], scales["down"], mods, cos, sin, k_all, v_all, bias,
            ws, counters, bars, err, counters if trace is None else trace, m, t, keys, prefix_len, self.eps, hd ** -0.5,
            strides.pop(),
            DEPTH=depth, WIDTH=width, MLP=mlp, NQ=heads, HD=hd,
            F8_QKV=kinds["qkv"][1] is not None, F8_O=kinds["o"][1] is not None,
            F8_GU=kinds["gate_up"][1] is not None, F8_D=kinds["down"][1] is not None,
            IEEE=x.dtype == torch.float32 or et.INTERPRET, GELU_C=et.GELU_C, BLOCK_M=BLOCK_M, **blocks,
            ATT_BQ=att_bq, ATT_BS=att_bs, BAR=2 if self.sleep_between_polls else 1, TRACE=trace is not None,
            num_warps=WARPS, num_stages=1)
        out.masked_fill_(err.view(1, 1, 1) != 0, float("nan"))  # a barrier gave up: the values are not to be used
        return out


class StepKernels(et.ExpertKernels):
    """The fused expert kernels with one observation's step as the persistent step kernel: a call of at most
    MAX_ROWS rows with stacked weights and caches runs `ExpertStep`, checked on its first call at a shape
    against the chained torch references (`status["step@M"]`); anything else, or a step kernel that failed
    its check, runs the per-layer kernels."""

    def __init__(self, heads: int, eps: float, attention, check_tol: float = 3e-2):
        super().__init__(heads, eps, attention, check_tol)
        self.step = ExpertStep(heads, eps)

    def stack(self, x, mods, cos, sin, bias, ks, vs, weights, prefix_len: int):
        args = (x, mods, cos, sin, bias, ks, vs, weights, prefix_len)
        if self.step.supports(x, ks, vs, weights):
            key = f"step@{x.shape[0] * x.shape[1]}"
            if key not in self.status:
                self._check_step(key, args)
            if self.status[key].startswith("ok"):
                return self.step(*args)
        return super().stack(*args)

    def _check_step(self, key: str, args) -> None:
        x = args[0]
        try:
            got = self.step(*args).clone()
            failed = self.step.failed(x.device)
        except Exception as exc:  # a kernel that does not build here must not sink the sampler
            self.status[key] = f"fallback: {type(exc).__name__}: {str(exc)[:300]}"
            log.warning("the persistent step kernel failed (%s); using the per-layer kernels", self.status[key])
            return
        if failed:
            self.status[key] = "fallback: a grid barrier gave up (programs not co-resident)"
            log.warning("the persistent step kernel %s", self.status[key])
            return
        ok, note = self._agrees(got, et.reference_stack(*args, heads=self.heads, eps=self.eps))
        self.status[key] = f"ok: {note}" if ok else f"fallback: mismatch, {note}"
        if ok:
            self.step(*args)  # leave the kernel's own K/V in the caches
        else:
            log.warning("the persistent step kernel disagrees with torch (%s); using the per-layer kernels", note)
