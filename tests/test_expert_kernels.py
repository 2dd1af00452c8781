"""The fused Triton expert kernels (policy/backends/expert_triton.py) on the CPU, in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py when there is no GPU): each kernel against its torch reference
in fp32 and in bf16 (the interpreter multiplies bf16 dot operands as fp32 and rounds to bf16 to
nearest even by hand, so bf16 results equal the references' to the bit but for summation order), the
references against the compile backend's expert layer, and the whole sampler against openpi's golden
actions (fp32) and against eager (bf16). The same kernels at real size on a GPU: tests/test_gpu.py."""

import pytest
import torch
import triton
import triton.language as tl

from policy.backends import expert_triton as et
from policy.backends.compiled import CompiledSampler, expert_layer, mqa_attention
from policy.backends.fp8 import E4M3_MAX, Fp8Matrix, quantize
from policy.backends.fused import ExpertWeights
from policy.pi05.checkpoints import load_model

EPS = 1e-6
TOL = 1e-5  # fp32, same maths in another order
DTYPES = [torch.float32, torch.bfloat16]


def close(out, ref) -> bool:
    """fp32: within TOL; bf16: within one bf16 step of the largest value (summation order may flip a rounding)."""
    if out.dtype == torch.float32:
        return float((out - ref).abs().max()) <= TOL * max(1.0, float(ref.abs().max()))
    return float((out.float() - ref.float()).abs().max()) <= 2 ** -7 * float(ref.float().abs().max())


def _rand(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _fp8(w):
    s = (w.abs().amax() / E4M3_MAX).reshape(())
    return Fp8Matrix(quantize(w, s), s, s)


@pytest.fixture(scope="module")
def tiny(golden_dir):
    return load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", dtype=torch.float32)


def test_kernels_run_in_the_interpreter_here():
    assert et.INTERPRET, "conftest sets TRITON_INTERPRET=1 on machines without CUDA"


@pytest.mark.parametrize("batch", [1, 3])  # 10 and 30 rows: one block of 16 / 32 rows, padded rows masked
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_kernel_matches_its_reference(batch, fp8, dtype):
    t, width, heads, hd, keys, prefix_len = 10, 48, 8, 32, 96, 37  # width 48: K not a multiple of the block
    x = _rand(batch, t, width, seed=1).to(dtype)
    w = _rand((heads + 2) * hd, width, scale=width ** -0.5, seed=2)
    w = _fp8(w) if fp8 else w.to(dtype)
    mods = _rand(2, width, scale=0.5, seed=3)
    angles = _rand(batch, t, hd // 2, seed=4)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))  # equal halves, as RoPE's

    def run(fn):
        q = torch.zeros(batch * t, heads * hd, dtype=dtype)
        k, v = torch.full((batch, keys, hd), 7.0, dtype=dtype), torch.full((batch, keys, hd), 7.0, dtype=dtype)
        fn(x, w, mods[0], mods[1], cos, sin, q, k, v, prefix_len, heads, EPS)
        return q, k, v

    (q, k, v), (q_ref, k_ref, v_ref) = run(et.qkv_rope), run(et.qkv_rope_reference)
    assert close(q, q_ref) and close(k, k_ref) and close(v, v_ref)
    # only the action tokens' rows of the cache were written; the prefix and the padding kept their values
    written = torch.zeros(keys, dtype=torch.bool)
    written[prefix_len:prefix_len + t] = True
    assert (k[:, ~written] == 7.0).all() and (v[:, ~written] == 7.0).all() and (k[:, written] != 7.0).all()


@pytest.mark.parametrize("rows", [10, 20])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_kernel_matches_its_reference(rows, fp8, dtype):
    n, k = 40, 72  # neither a multiple of the blocks: masked columns and K tail
    a, res, gate = _rand(rows, k, seed=5).to(dtype), _rand(rows, n, seed=6).to(dtype), _rand(n, seed=7)
    w = _rand(n, k, scale=k ** -0.5, seed=8)
    w = _fp8(w) if fp8 else w.to(dtype)
    out, ref = torch.full((rows, n), 3.0, dtype=dtype), torch.full((rows, n), 3.0, dtype=dtype)
    et.gated_residual(a, w, res, gate, out)
    et.gated_residual_reference(a, w, res, gate, ref)
    assert close(out, ref)
    manual = res.float() + gate * (a.float() @ (w.w8.float() * w.w_scale if fp8 else w.float()).T)
    assert (out.float() - manual).abs().max() <= (1e-4 if dtype == torch.float32 else 0.05 * manual.abs().max())


@pytest.mark.parametrize("rows", [10, 20])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_kernel_matches_its_reference(rows, fp8, dtype):
    width, hidden = 48, 64
    x, mods = _rand(rows, width, scale=3.0, seed=9).to(dtype), _rand(2, width, scale=0.5, seed=10)
    w = _rand(2 * hidden, width, scale=2 * width ** -0.5, seed=11)  # large pre-activations: both tails of tanh
    w = _fp8(w) if fp8 else w.to(dtype)
    out, ref = torch.zeros(rows, hidden, dtype=dtype), torch.zeros(rows, hidden, dtype=dtype)
    et.geglu(x, w, mods[0], mods[1], out, EPS)
    et.geglu_reference(x, w, mods[0], mods[1], ref, EPS)
    assert close(out, ref)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_key_attention_kernels_match_the_compile_backends_attention(batch, dtype):
    t, heads, hd, keys, prefix_len = 10, 8, 32, 192, 100  # 3 key splits of 64; the last one fully masked
    q = _rand(batch, t * heads, hd, seed=27).to(dtype)
    k, v = _rand(batch, keys, hd, scale=2.0, seed=28).to(dtype), _rand(batch, keys, hd, seed=29).to(dtype)
    bias = torch.full((batch, 1, keys), et.MASKED)
    bias[:, :, : prefix_len + t] = 0.0
    bias[-1, :, 3:40] = et.MASKED  # padded prompt tokens of one row
    out = torch.zeros(batch * t * heads, hd, dtype=dtype)
    et.attention(q, k, v, bias, out)
    ref = mqa_attention(q, k, v, bias).reshape(batch * t * heads, hd)
    if dtype == torch.float32:
        assert close(out, ref)
    else:  # bf16 probabilities rounded before (not after) normalization: a few bf16 steps apart, no bias
        d = (out.float() - ref.float()).abs()
        assert float(d.max()) <= 2 ** -5 * float(ref.float().abs().max()) and float(d.mean()) <= 2e-3
    ref2 = torch.zeros_like(out)
    et.attention_reference(q, k, v, bias, ref2)
    assert torch.equal(ref2, ref)


def test_fused_layer_equals_the_compile_backends_expert_layer():
    """The kernels' layer (through their torch references, then the kernels) computes what the
    inductor path's expert_layer does: the references are the same fusion, not another model."""
    b, t, width, heads, hd, mlp, keys, prefix_len = 2, 10, 32, 8, 16, 64, 64, 40
    x = _rand(b, t, width, seed=12)
    w = ExpertWeights(qkv=_rand((heads + 2) * hd, width, scale=0.2, seed=13), o=_rand(width, heads * hd, scale=0.1, seed=14),
                      gate_up=_rand(2 * mlp, width, scale=0.2, seed=15), down=_rand(width, mlp, scale=0.1, seed=16))
    mods = _rand(6, width, scale=0.3, seed=17)
    angles = _rand(b, t, hd // 2, seed=18)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    bias = torch.zeros(b, 1, keys)
    bias[:, :, prefix_len + t:] = -2.3819763e38
    bias[1, :, 5:9] = -2.3819763e38  # masked prefix keys too
    prefix_k, prefix_v = _rand(b, keys, hd, seed=19), _rand(b, keys, hd, seed=20)
    attention = lambda q, k, v, bias: mqa_attention(q, k, v, bias).reshape(b, t, heads * hd)  # noqa: E731

    ref_k, ref_v = prefix_k.clone(), prefix_v.clone()
    ref = expert_layer(x, mods, cos, sin, bias, ref_k, ref_v, *w, heads=heads, hd=hd, eps=EPS, prefix_len=prefix_len)
    for attn, kernels in ((attention, ["down_residual@20", "geglu@20", "o_residual@20", "qkv_rope@20"]),
                          (None, ["attention@20", "down_residual@20", "geglu@20", "o_residual@20", "qkv_rope@20"])):
        fused = et.ExpertKernels(heads, EPS, attn)  # None: the split-key attention kernels
        k, v = prefix_k.clone(), prefix_v.clone()
        out = fused.layer(x, mods, cos, sin, bias, k, v, w, prefix_len)
        assert (out - ref).abs().max() <= 1e-4 and (k - ref_k).abs().max() <= 1e-5 and (v - ref_v).abs().max() <= 1e-5
        assert sorted(fused.status) == kernels
        assert all(s.startswith("ok") for s in fused.status.values()), fused.status


def test_a_kernel_that_fails_falls_back_to_its_reference_and_says_so(monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("no kernel for you")

    monkeypatch.setitem(et.KERNELS, "geglu", (broken, et.geglu_reference))
    fused = et.ExpertKernels(8, EPS, None)
    x, w, mods = _rand(10, 16, seed=21), _rand(64, 16, seed=22), _rand(2, 16, seed=23)
    out, ref = torch.zeros(10, 32), torch.zeros(10, 32)
    for _ in range(2):
        fused._run("geglu", "geglu", 10, (x, w, mods[0], mods[1], out, EPS), lambda: (out,))
    et.geglu_reference(x, w, mods[0], mods[1], ref, EPS)
    assert torch.equal(out, ref) and fused.status["geglu@10"].startswith("fallback: RuntimeError: no kernel")


def test_a_kernel_that_disagrees_with_its_reference_is_not_used(monkeypatch):
    def wrong(x, w, scale, shift, out, eps, **kw):
        et.geglu(x, w, scale, shift, out, eps, **kw)
        out.mul_(1.5)

    monkeypatch.setitem(et.KERNELS, "geglu", (wrong, et.geglu_reference))
    fused = et.ExpertKernels(8, EPS, None)
    x, w, mods = _rand(10, 16, seed=24), _rand(64, 16, seed=25), _rand(2, 16, seed=26)
    out, ref = torch.zeros(10, 32), torch.zeros(10, 32)
    fused._run("geglu", "geglu", 10, (x, w, mods[0], mods[1], out, EPS), lambda: (out,))
    et.geglu_reference(x, w, mods[0], mods[1], ref, EPS)
    assert torch.equal(out, ref) and fused.status["geglu@10"].startswith("fallback: mismatch")


@pytest.mark.parametrize("steps,attention", [(1, "compiled"), (10, "compiled"), (3, "triton")])
def test_sampler_with_triton_expert_kernels_matches_openpi(tiny, golden_inputs, golden_case, steps, attention):
    """The whole denoise loop through the kernels (the golden batch of 2: 20 rows, masked prefix keys)."""
    key = {1: "actions_1step", 3: "actions_3steps", 10: "actions_10steps"}[steps]
    sampler = CompiledSampler(tiny, num_steps=steps, torch_compile=False, expert_kernels="triton",
                              expert_attention=attention, expert_kernel_rows=20)
    out = sampler(*golden_inputs)
    assert (out - golden_case[f"output.{key}"]).abs().max() <= 1e-4  # the golden tolerance
    kernels = ("qkv_rope", "o_residual", "geglu", "down_residual") + (("attention",) if attention == "triton" else ())
    assert set(sampler.kernel_status) == {f"{k}@20" for k in kernels}
    assert all(s.startswith("ok") for s in sampler.kernel_status.values()), sampler.kernel_status


def test_kernels_run_one_observation_and_leave_larger_batches_to_the_inductor_layer(tiny, golden_inputs, golden_case):
    """By default the fused kernels take calls of one observation (10 rows); the golden batch of 2 (20 rows)
    runs the inductor layer (on an H200 the kernels are slower there). Both match openpi's actions."""
    sampler = CompiledSampler(tiny, num_steps=3, torch_compile=False, expert_kernels="triton")
    golden = golden_case["output.actions_3steps"]
    both = sampler(*golden_inputs)
    assert sampler.kernel_status == {} and (both - golden).abs().max() <= 1e-4
    images, image_masks, tokens, token_masks, noise = golden_inputs
    one = sampler([im[1:] for im in images], [m[1:] for m in image_masks], tokens[1:], token_masks[1:], noise[1:])
    assert set(sampler.kernel_status) == {f"{k}@10" for k in ("qkv_rope", "o_residual", "geglu", "down_residual")}
    assert (one[0] - golden[1]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="expert_kernel_rows"):
        CompiledSampler(tiny, num_steps=1, torch_compile=False, expert_kernels="triton", expert_kernel_rows=0)


def test_one_observation_of_a_longer_chunk_still_runs_the_kernels():
    """pi05_base predicts 50 actions: one observation is 50 rows, and the kernels still take it."""
    from policy.pi05.config import get_config
    from policy.pi05.examples import example_inputs
    from policy.pi05.weights import random_model

    model = random_model(get_config("tiny", chunk_size=50), dtype=torch.float32)
    sampler = CompiledSampler(model, num_steps=1, torch_compile=False, expert_kernels="triton")
    out = sampler(*example_inputs(model.config, 1, 8))
    assert sampler.expert_kernel_rows == 50 and out.shape[1] == 50
    assert set(sampler.kernel_status) == {f"{k}@50" for k in ("qkv_rope", "o_residual", "geglu", "down_residual")}
    assert all(v.startswith("ok") for v in sampler.kernel_status.values()), sampler.kernel_status


def test_pdl_is_turned_off_only_when_a_plain_launch_works(monkeypatch):
    """A launch that fails only with programmatic dependent launch (an older driver) turns PDL off and
    runs plainly; one that fails either way raises its own error and leaves PDL on for the next kernel."""
    monkeypatch.setattr(et, "pdl_supported", lambda device: True)
    monkeypatch.setattr(et, "_PDL_BROKEN", [])
    calls = []

    def needs_plain(pdl):
        calls.append(pdl)
        if pdl:
            raise RuntimeError("launch attribute not supported")

    et._with_pdl(torch.device("cpu"), needs_plain)
    assert calls == [True, False] and et._PDL_BROKEN and "attribute" in et._PDL_BROKEN[0]

    monkeypatch.setattr(et, "_PDL_BROKEN", [])
    calls.clear()

    def broken(pdl):
        calls.append(pdl)
        raise ValueError("bad arguments")

    with pytest.raises(ValueError, match="bad arguments"):
        et._with_pdl(torch.device("cpu"), broken)
    assert calls == [True, False] and et._PDL_BROKEN == []


@triton.jit
def _bounded_columns_probe(x_ptr, w_ptr, ws_ptr, cnt_ptr, out1_ptr, out2_ptr, M, N1, N, K: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_product's two column sets with their own bounds, as GEGLU uses them: cols1 (gate) < N1 = N / 2."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, 16)
    acc1, acc2, sq, sh1, sh2, last = et._product(x_ptr, w_ptr, ws_ptr, cnt_ptr, rows, cols, cols + N1, M, N1, N, K,
                                                 x_ptr, x_ptr, False, True, True, False, 16, BLOCK_N, BLOCK_K, True,
                                                 tl.program_id(1), tl.program_id(0), 16, False, cnt_ptr, 1, cnt_ptr,
                                                 False, False)
    if last:
        at = rows[:, None] * (tl.num_programs(0) * BLOCK_N) + cols[None, :]
        tl.store(out1_ptr + at, acc1)
        tl.store(out2_ptr + at, acc2)


def test_a_tile_past_the_gate_columns_leaves_the_up_columns_alone():
    """hidden = 40 is not a multiple of the 16-column tiles: the last gate tile's columns 40-47 are up
    columns 0-7, which belong to the first tile's second half. They must count as outside (zeros), not be
    computed (and, on a GPU, written to the workspace) twice by two tiles at once."""
    rows, hidden, k = 10, 40, 64  # 3 tiles of 16 gate columns, 2 K slices of 32
    x, w = _rand(rows, k, seed=40), _rand(2 * hidden, k, seed=41)
    tiles = 3
    out1, out2 = torch.full((16, tiles * 16), 9.0), torch.full((16, tiles * 16), 9.0)
    scratch = et.Scratch()
    ws, cnt = scratch.get(x.device, 2 * (16 * 2 * hidden + 16 + 2 * hidden), 16)
    _bounded_columns_probe[(tiles, 2, 1)](x, w, ws, cnt, out1, out2, rows, hidden, 2 * hidden, k, BLOCK_N=16, BLOCK_K=32)
    full = x @ w.T  # (rows, 2 * hidden)
    assert torch.allclose(out1[:rows, :hidden], full[:, :hidden], atol=1e-4)
    assert (out1[:, hidden:] == 0).all()  # past the gate columns: nothing
    up = out2[:rows, :hidden]  # tile j's second half: up columns of the same index
    assert torch.allclose(up, full[:, hidden:], atol=1e-4) and not cnt.any()


def test_fp8_sampler_with_triton_expert_kernels_stays_close_to_eager(tiny, golden_inputs):
    from policy.backends import make_sampler
    from policy.backends.fp8 import Fp8Sampler

    ref = make_sampler("eager", tiny, num_steps=3)(*golden_inputs)
    calibration = [golden_inputs[:4]]
    mm = Fp8Sampler(tiny, num_steps=3, emulate=True, calibration=calibration)(*golden_inputs)
    fused = Fp8Sampler(tiny, num_steps=3, emulate=True, calibration=calibration, expert_kernels="triton",
                       expert_kernel_rows=20)
    out = fused(*golden_inputs)
    assert all(s.startswith("ok") for s in fused.kernel_status.values()) and len(fused.kernel_status) == 4
    # weight-only FP8 in the expert MLP (activations stay exact) is no further from eager than _scaled_mm's
    err, err_mm = (out - ref).abs().mean(), (mm - ref).abs().mean()
    print(f"fp8 vs eager, tiny model, 3 steps: fused kernels mean {err:.2e}, _scaled_mm emulated mean {err_mm:.2e}")
    assert 0 < err < 0.1 and (out - ref).abs().max() < 0.5


def test_triton_expert_kernels_need_a_gpu_or_the_interpreter(tiny, monkeypatch):
    monkeypatch.setattr(et, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        CompiledSampler(tiny, num_steps=1, torch_compile=False, expert_kernels="triton")
    with pytest.raises(ValueError, match="inductor or triton"):
        CompiledSampler(tiny, num_steps=1, torch_compile=False, expert_kernels="cuda")
    with pytest.raises(ValueError, match="add expert_kernels='triton'"):
        CompiledSampler(tiny, num_steps=1, torch_compile=False, expert_attention="triton")


def test_bf16_sampler_with_triton_expert_kernels_stays_as_close_to_eager_as_the_inductor_path(golden_dir, golden_inputs):
    """bf16 as served: the fused kernels move the actions no further from eager than the compile backend's
    own (inductor-path) structure does, and every kernel passes its check against its reference."""
    from policy.backends import make_sampler

    model = load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", dtype=torch.bfloat16)
    ref = make_sampler("eager", model, num_steps=3)(*golden_inputs)
    structure = CompiledSampler(model, num_steps=3, torch_compile=False)(*golden_inputs)
    base = float((structure - ref).abs().mean())
    for attention in ("compiled", "triton"):
        fused = CompiledSampler(model, num_steps=3, torch_compile=False, expert_kernels="triton", expert_attention=attention,
                                expert_kernel_rows=20)
        out = fused(*golden_inputs)
        err = float((out - ref).abs().mean())
        print(f"bf16 vs eager, tiny, 3 steps: inductor path {base:.2e}, triton kernels ({attention} attention) {err:.2e}")
        assert err <= 1.5 * base + 1e-4, (attention, err, base)
        assert all(s.startswith("ok") for s in fused.kernel_status.values()), fused.kernel_status


def test_autotune_splits_k_for_one_observation_and_loops_over_k_for_more_rows():
    full = et.CONFIGS
    split = [c for c in full if c.kwargs["SPLIT_K"]]
    assert split and all(c.kwargs["BLOCK_M"] == 16 for c in split)
    assert et.prune_configs(full, {}, M=10) == split
    assert et.prune_configs(full, {"M": 10}) == split  # older Triton: positional args
    assert et.prune_configs(full, {}, M=160) == [c for c in full if not c.kwargs["SPLIT_K"]]
    assert et.prune_configs(full, {}) == full


def test_split_k_reduction_is_deterministic_and_leaves_its_counters_at_zero():
    """Eight K slices per tile, reduced by the program that completes the tile; a second launch on the
    same scratch (as a graph replay) finds the counters back at zero and gives the same bits."""
    rows, n, k = 10, 48, 256  # 3 column tiles x 8 slices of 32
    a, res, gate = _rand(rows, k, seed=30).to(torch.bfloat16), _rand(rows, n, seed=31).to(torch.bfloat16), _rand(n, seed=32)
    w = _rand(n, k, scale=k ** -0.5, seed=33).to(torch.bfloat16)
    scratch = et.Scratch()
    outs = []
    for _ in range(2):
        out = torch.full((rows, n), 5.0, dtype=torch.bfloat16)
        et.gated_residual(a, w, res, gate, out, scratch=scratch)
        outs.append(out)
        ws, cnt = scratch.get(a.device, 0, 0)
        assert not cnt.any(), "every tile's counter is reset by the program that reduced it"
    ref = torch.zeros_like(outs[0])
    et.gated_residual_reference(a, w, res, gate, ref)
    assert torch.equal(outs[0], outs[1]) and close(outs[0], ref)


def test_scratch_grows_without_freeing_what_captured_graphs_point_at():
    scratch = et.Scratch()
    ws, cnt = scratch.get(torch.device("cpu"), 100, 4)
    assert scratch.get(torch.device("cpu"), 50, 2)[0] is ws  # enough room: the same buffer
    ws2, cnt2 = scratch.get(torch.device("cpu"), 1000, 4)
    assert ws2.numel() >= 1000 and ws2 is not ws and not cnt2.any()
    assert any(old[0] is ws for old in scratch._retired)  # still referenced: a graph may use it
