"""The persistent step kernel (policy/backends/expert_step.py) on the CPU, in Triton's interpreter: one
program does every item of every stage, so the whole step's maths (split-K reductions, the attention's
merge, the barrier counters' resets) is checked against the fused kernels'
torch references chained; plus the stacked layouts it needs and the sampler's routing to it. The same
kernel at real size on a GPU, with its barriers: tests/test_gpu.py."""

import pytest
import torch

from policy.backends import expert_step as es
from policy.backends import expert_triton as et
from policy.backends.compiled import MASKED, CompiledSampler
from policy.backends.fp8 import E4M3_MAX, Fp8Matrix, quantize
from policy.backends.fused import ExpertWeights

EPS = 1e-6


def _problem(dtype, fp8=False, depth=2, width=32, mlp=64, heads=8, hd=16, t=10, prefix=37, keys=64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    def fp8m(m):
        s = (m.abs().amax() / E4M3_MAX).reshape(())
        return Fp8Matrix(quantize(m, s), s, s)

    layers = []
    for _ in range(depth):
        gu, down = w(2 * mlp, width), w(width, mlp)
        layers.append(ExpertWeights(w((heads + 2) * hd, width).to(dtype), w(width, heads * hd).to(dtype),
                                    fp8m(gu) if fp8 else gu.to(dtype), fp8m(down) if fp8 else down.to(dtype)))
    ks = list((torch.randn(depth, 1, keys, hd, generator=g)).to(dtype).unbind(0))
    vs = list((torch.randn(depth, 1, keys, hd, generator=g)).to(dtype).unbind(0))
    bias = torch.full((1, 1, keys), MASKED)
    bias[:, :, : prefix + t] = 0.0
    angles = torch.randn(1, t, hd // 2, generator=g)
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    return dict(x=torch.randn(1, t, width, generator=g).to(dtype), mods=torch.randn(depth, 6, width, generator=g) * 0.3,
                cos=cos, sin=sin, bias=bias, ks=ks, vs=vs, weights=es.stack_layers(layers), prefix_len=prefix, heads=heads)


def _args(p):
    return (p["x"], p["mods"], p["cos"], p["sin"], p["bias"], p["ks"], p["vs"], p["weights"], p["prefix_len"])


@pytest.mark.parametrize("dtype,fp8", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_step_kernel_matches_the_chained_layer_references(dtype, fp8):
    p = _problem(dtype, fp8)
    step = es.ExpertStep(p["heads"], EPS)
    assert step.supports(p["x"], p["ks"], p["vs"], p["weights"])
    out = step(*_args(p))
    k_kernel, v_kernel = torch.stack(p["ks"]).clone(), torch.stack(p["vs"]).clone()
    ref = et.reference_stack(*_args(p), heads=p["heads"], eps=EPS)
    if dtype == torch.float32:
        assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
        assert torch.allclose(k_kernel, torch.stack(p["ks"]), atol=1e-5)
    else:  # bf16 roundings in another order, compounding over the layers
        assert (out.float() - ref.float()).abs().max() <= 2 ** -6 * float(ref.float().abs().max())
        assert torch.allclose(k_kernel.float(), torch.stack(p["ks"]).float(), atol=5e-2, rtol=2e-2)
    # every tile counter and every barrier counter is back at zero (a graph replays the launch as is); no error
    ws, cnt = step.scratch._buffers[p["x"].device]
    assert not cnt.any() and not step.failed(p["x"].device)
    # only the action tokens' K/V rows were written (the prefix and the padding are the caller's)
    fresh = _problem(dtype, fp8)
    rows = torch.zeros(p["ks"][0].shape[1], dtype=torch.bool)
    rows[p["prefix_len"]:p["prefix_len"] + 10] = True
    assert torch.equal(torch.stack(p["ks"])[:, :, ~rows], torch.stack(fresh["ks"])[:, :, ~rows])


def test_stage_blocks_keep_one_item_a_program_within_the_register_budget():
    """Real size on 132 SMs: K slices no longer than MAX_BK, and as many as keep one item a program (a
    second round of items is not prefetched: it costs a whole extra memory round trip)."""
    blocks = es.stage_blocks(1024, 4096, 8, 256, 132)
    items = {"Q": 10 * (128 // blocks["Q_BN"]) * (1024 // blocks["Q_BK"]), "O": 1024 // blocks["O_BN"] * (2048 // blocks["O_BK"]),
             "G": 4096 // blocks["G_BN"] * (1024 // blocks["G_BK"]), "D": 1024 // blocks["D_BN"] * (4096 // blocks["D_BK"])}
    for name, n in items.items():
        assert blocks[f"{name}_BK"] <= es.MAX_BK[name], name
        if blocks[f"{name}_BK"] < es.MAX_BK[name]:  # split further than the registers ask: for the programs only
            assert n <= 132 < 2 * n, (name, n)
    assert items["Q"] <= 132 and items["O"] <= 132 and items["D"] <= 132  # one round; GEGLU needs two (MAX_BK)


def test_stacked_view_finds_consecutive_views_of_one_tensor_only():
    """The kernel steps from one layer to the next by a layer's size: a gap between layers (every other
    layer, an interleaved K/V buffer) must not count as stacked, or it would read and write the gaps."""
    base = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5)
    view = es.stacked_view(list(base.unbind(0)))
    assert view is not None and torch.equal(view, base) and view.data_ptr() == base.data_ptr()
    assert es.stacked_view([torch.zeros(4, 5) for _ in range(3)]) is None  # separate tensors
    assert es.stacked_view([base[0], base[2]]) is None  # evenly spaced, with a gap
    kv = torch.zeros(3, 2, 4, 5)  # (depth, K/V, ...): the K views are a layer apart with a V between
    assert es.stacked_view([kv[i, 0] for i in range(3)]) is None
    assert es.stacked_view([base[0], base[1], base[0]]) is None  # not in order
    assert es.stacked_view([base[0], base[1, :3]]) is None  # shapes differ
    assert es.stacked_view([t.t() for t in base.unbind(0)]) is None  # not contiguous


def test_stacked_weights_keep_their_values_and_align_the_fp8_scales():
    """The samplers' expert weights become views of one tensor per kind; each FP8 scale starts on 16 bytes
    (cuBLASLt's FP8 products reject a scale pointer that does not, which the batch-16 inductor path hit)."""
    p = _problem(torch.bfloat16, fp8=True, depth=3)
    layers = p["weights"]
    again = es.stack_layers(layers)
    for a, b in zip(layers, again):
        assert torch.equal(a.qkv, b.qkv) and torch.equal(a.gate_up.w8.float(), b.gate_up.w8.float())
        assert float(a.down.w_scale) == float(b.down.w_scale)
    for lw in again:
        for m in (lw.gate_up, lw.down):
            assert m.w_scale.data_ptr() % 16 == 0 and m.w_scale.dim() == 0
    assert es.stacked_view([lw.qkv for lw in again]) is not None


@pytest.fixture(scope="module")
def tiny(golden_dir):
    from policy.pi05.checkpoints import load_model

    return load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", dtype=torch.float32)


def test_sampler_runs_one_observation_through_the_step_kernel_when_asked(tiny, golden_inputs, golden_case):
    """`expert_persistent=True`: one observation's step is the step kernel (checked once against the
    references), matching openpi's actions; the golden batch of 2 runs the per-layer kernels. Off by default."""
    images, image_masks, tokens, token_masks, noise = golden_inputs
    one = ([im[1:] for im in images], [m[1:] for m in image_masks], tokens[1:], token_masks[1:], noise[1:])
    sampler = CompiledSampler(tiny, num_steps=3, torch_compile=False, expert_kernels="triton", expert_persistent=True,
                              expert_kernel_rows=20)
    out = sampler(*one)
    assert set(sampler.kernel_status) == {"step@10"} and sampler.kernel_status["step@10"].startswith("ok")
    assert (out[0] - golden_case["output.actions_3steps"][1]).abs().max() <= 1e-4
    both = sampler(*golden_inputs)  # 20 rows: more than the step kernel's MAX_ROWS
    assert "qkv_rope@20" in sampler.kernel_status
    assert (both - golden_case["output.actions_3steps"]).abs().max() <= 1e-4
    default = CompiledSampler(tiny, num_steps=3, torch_compile=False, expert_kernels="triton")
    default(*one)
    assert "step@10" not in default.kernel_status


def test_a_step_kernel_that_disagrees_is_replaced_by_the_layer_kernels(monkeypatch):
    p = _problem(torch.float32)
    fused = es.StepKernels(p["heads"], EPS, None)
    monkeypatch.setattr(et, "reference_stack", lambda *a, **k: torch.full_like(p["x"], 100.0))
    out = fused.stack(*_args(p))
    assert fused.status["step@10"].startswith("fallback: mismatch")
    assert "qkv_rope@10" in fused.status  # the per-layer kernels ran instead
    monkeypatch.undo()
    assert (out - et.reference_stack(*_args(p), heads=p["heads"], eps=EPS)).abs().max() <= 1e-5


def test_the_trace_buffer_and_the_modulations_are_checked():
    p = _problem(torch.float32)
    step = es.ExpertStep(p["heads"], EPS)
    step.trace = torch.zeros(1, 3, dtype=torch.int64)  # one program, 2 layers x 5 stages: (1, 10) wanted
    with pytest.raises(ValueError, match="trace buffer"):
        step(*_args(p))
    step.trace = torch.zeros(1, 10, dtype=torch.int64)  # right: accepted (the interpreter has no timer to record)
    assert torch.isfinite(step(*_args(p))).all()
    with pytest.raises(ValueError, match="mods"):
        step(p["x"], p["mods"][:1], *_args(p)[2:])


def test_a_launch_starts_from_clean_counters_whatever_the_last_one_left():
    """A launch that gave up on a GPU can leave a tile counter non-zero; the next must not inherit it (a
    reducer firing early would make every later launch wrong)."""
    p = _problem(torch.float32)
    step = es.ExpertStep(p["heads"], EPS)
    step(*_args(p))
    ws, cnt = step.scratch._buffers[p["x"].device]
    cnt[:4] = 1  # as a launch that gave up mid-stage leaves them
    out = step(*_args(p))
    assert (out - et.reference_stack(*_args(p), heads=p["heads"], eps=EPS)).abs().max() <= 1e-5


def test_a_barrier_that_gave_up_makes_the_output_nan_and_says_so():
    """The error flag (raised on the GPU by a barrier that gave up) is sticky: the step's output is NaN, not
    plausible numbers, for that launch and every later one, and `failed()` reports it."""
    p = _problem(torch.float32)
    step = es.ExpertStep(p["heads"], EPS)
    assert torch.isfinite(step(*_args(p))).all() and not step.failed(p["x"].device)
    ws, cnt = step.scratch._buffers[p["x"].device]
    cnt[-1] = 1  # the flag, as _grid_wait raises it
    assert step(*_args(p)).isnan().all() and step.failed(p["x"].device)
    assert step(*_args(p)).isnan().all()


def test_bad_shapes_are_refused_before_anything_is_written():
    p = _problem(torch.float32)
    step = es.ExpertStep(p["heads"], EPS)
    keys = p["ks"][0].shape[1]
    before = torch.stack(p["ks"]).clone()
    with pytest.raises(ValueError, match="do not fit a cache"):  # would write into the next layer's prefix
        step(*_args(p)[:8], keys - 5)
    with pytest.raises(ValueError, match="key bias"):
        step(*_args(p)[:4], p["bias"][:, :, :-1].contiguous(), *_args(p)[5:])
    with pytest.raises(ValueError, match="cos/sin"):
        step(p["x"], p["mods"], p["cos"][:, :5].contiguous(), *_args(p)[3:])
    assert torch.equal(torch.stack(p["ks"]), before)
    gapped = [lw for lw in es.stack_layers(p["weights"] * 2)][::2]  # every other layer of a stack of 4
    assert not step.supports(p["x"], p["ks"], p["vs"], gapped)


def test_persistent_needs_the_fused_kernels(tiny):
    with pytest.raises(ValueError, match="expert_kernels='triton'"):
        CompiledSampler(tiny, num_steps=1, torch_compile=False, expert_persistent=True)
