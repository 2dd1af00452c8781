"""GPU checks (H100/H200), run on the device with `pytest -m gpu -s`: the real-size model in bf16,
bf16-vs-fp32 agreement, every backend against eager, the golden parity on the GPU, compile stability
and no device sync in a CUDA-graph call, and the fused Triton expert kernels (each against its torch
reference at real size in bf16, with timings; the samplers using them against eager)."""

import pytest
import torch

from policy.backends import make_sampler
from policy.pi05.checkpoints import load_model
from policy.pi05.examples import example_inputs
from policy.pi05.weights import random_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (run them with -m gpu on a GPU machine)"
    return torch.device("cuda")


@pytest.fixture(scope="module")
def big(cuda):
    return random_model("pi05_libero", seed=0, device=cuda, dtype=torch.bfloat16)


@pytest.mark.parametrize("batch", [1, 16])
def test_real_size_bf16_samples_at_1_and_10_steps(big, cuda, batch):
    inputs = example_inputs(big.config, batch, 24, cuda)
    for steps in (1, 10):
        torch.cuda.reset_peak_memory_stats()
        actions = big.sample_actions(*inputs[:4], noise=inputs[4], num_steps=steps)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"\n[{torch.cuda.get_device_name(0)}] real-size bf16, batch {batch}, {steps} steps: "
              f"peak {peak:.2f} GiB, |actions| max {actions.abs().max().item():.2f}")
        assert actions.shape == (batch, 10, 32) and torch.isfinite(actions).all()


def test_bf16_agrees_with_fp32_at_real_size(big, cuda):
    fp32 = random_model("pi05_libero", seed=0, device=cuda, dtype=torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    inputs = example_inputs(big.config, 2, 24, cuda)
    a32 = fp32.sample_actions(*inputs[:4], noise=inputs[4], num_steps=10)
    a16 = big.sample_actions(*inputs[:4], noise=inputs[4], num_steps=10)
    d = (a16 - a32).abs()
    print(f"\nbf16 vs fp32, real size, random weights, 10 steps: max {d.max().item():.3e}, mean {d.mean().item():.3e}, "
          f"|actions| mean {a32.abs().mean().item():.2f}")
    assert torch.isfinite(a16).all() and d.mean().item() < 0.05 * a32.abs().mean().item()
    del fp32
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["compile", "fp8"])
def test_backend_matches_eager_at_real_size(big, cuda, backend):
    if backend == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.fail("FP8 needs compute capability 8.9+ (H100/H200 have 9.0)")
    for batch in (1, 16):
        inputs = example_inputs(big.config, batch, 24, cuda, seed=batch)
        ref = make_sampler("eager", big, num_steps=10)(*inputs)
        out = make_sampler(backend, big, num_steps=10)(*inputs)
        d = (out - ref).abs()
        print(f"\n{backend} vs eager, batch {batch}, 10 steps: max {d.max().item():.3e}, mean {d.mean().item():.3e}")
        assert torch.isfinite(out).all() and d.mean().item() < (0.05 if backend == "compile" else 0.15)


def test_golden_parity_on_the_gpu(golden_dir, golden_case, golden_inputs, cuda):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    case = {k: v.to(cuda) for k, v in golden_case.items()}
    model = load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", device=cuda, dtype=torch.float32)
    images, masks, tokens, tmask, noise = golden_inputs
    args = ([x.to(cuda) for x in images], [m.to(cuda) for m in masks], tokens.to(cuda), tmask.to(cuda))
    for n, key in ((1, "actions_1step"), (10, "actions_10steps")):
        a = model.sample_actions(*args, noise=noise.to(cuda), num_steps=n)
        err = (a - case[f"output.{key}"]).abs().max().item()
        c = make_sampler("compile", model, num_steps=n)(*args, noise.to(cuda))
        cerr = (c - case[f"output.{key}"]).abs().max().item()
        print(f"\nGPU fp32 parity, {n} steps: eager {err:.2e}, compile {cerr:.2e}")
        assert err <= 1e-4 and cerr <= 1e-4


def _host_masks(inputs):
    """The inputs with their masks on the host, as Pi05Policy passes them."""
    images, masks, tokens, tmask, noise = inputs
    return images, [m.cpu() for m in masks], tokens, tmask.cpu(), noise


def test_cuda_graph_call_is_stable_and_never_syncs(big, cuda):
    """Compile stability on the CUDA-graph path (no graph break; a second call of the same shape compiles
    nothing), and with host masks the call is input copies + graph replays: no device sync at all."""
    from torch._dynamo.utils import counters

    counters.clear()
    sampler = make_sampler("compile", big, num_steps=10)
    inputs = _host_masks(example_inputs(big.config, 1, 24, cuda))
    first = sampler(*inputs)
    torch.cuda.synchronize()
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = sampler(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, again) and counters["stats"]["unique_graphs"] == graphs
    # a call is ONE graph replay (the whole sample), and it gives what the three stage graphs give in turn
    replays = []
    for g in sampler._states.values():
        for name, graph in g.graphs.items():
            graph.replay = (lambda orig, name: lambda: (replays.append(name), orig())[1])(graph.replay, name)
    third = sampler(*inputs)
    assert replays == ["call"] and torch.equal(third, first)
    for stage in sampler.stages(*inputs).values():
        stage()
    st = next(iter(sampler._states.values()))
    assert torch.equal(st.actions, first)


# ----- fused Triton expert kernels (policy/backends/expert_triton.py) -------------------------------------

def _time_us(fn) -> float:
    """Device time of fn in microseconds, replayed in a CUDA graph (no launch overhead, as in the sampler)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    try:
        return 1000 * triton.testing.do_bench_cudagraph(fn, rep=50)
    except Exception:  # some references may not capture; plain launches then
        return 1000 * triton.testing.do_bench(fn, warmup=10, rep=50)


@pytest.fixture(scope="module")
def expert0(big):
    """The fused weights of the first expert layer (as the compile backend holds them)."""
    from policy.backends.fused import ExpertWeights

    layer = big.expert.layers[0]
    a, mlp = layer.self_attn, layer.mlp
    return ExpertWeights(qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), o=a.o_proj.weight,
                         gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), down=mlp.down_proj.weight)


@pytest.mark.parametrize("rows", [10, 160])  # batch 1 and batch 16 x 10 action tokens
@pytest.mark.parametrize("mlp_fp8", [False, True])
def test_triton_expert_kernels_match_torch_at_real_size(big, cuda, expert0, rows, mlp_fp8):
    """Each kernel against its torch reference (the same fusion with cuBLAS and pointwise ops), bf16,
    real sizes, the weights of the first expert layer; prints both times."""
    from policy.backends import expert_triton as et
    from policy.backends.compiled import MASKED
    from policy.backends.fp8 import E4M3_MAX, Fp8Matrix, quantize
    from policy.backends.fused import precompute_modulations
    from policy.pi05.gemma import rope_cos_sin

    cfg = big.config
    w = expert0
    if mlp_fp8:  # as the fp8 backend quantizes the expert MLP
        def fp8(m):
            s = (m.abs().amax().float() / E4M3_MAX).reshape(())
            return Fp8Matrix(quantize(m, s).contiguous(), s, s)
        w = w._replace(gate_up=fp8(w.gate_up), down=fp8(w.down))
    b, t, width, heads, hd = rows // 10, 10, cfg.expert_width, cfg.num_heads, cfg.head_dim
    keys, prefix_len = 576, 536
    g = torch.Generator(device=cuda).manual_seed(rows)
    x = torch.randn(b, t, width, device=cuda, generator=g).to(torch.bfloat16)
    mods = precompute_modulations(big, [0.5])[0][0, 0]  # (6, width) of layer 0 at t = 0.5
    cos, sin = (c[:, 0].contiguous() for c in rope_cos_sin(prefix_len + torch.arange(t, device=cuda).expand(b, t),
                                                             hd, cfg.rope_theta, torch.bfloat16))
    cache = [torch.randn(b, keys, hd, device=cuda, generator=g).to(torch.bfloat16) for _ in range(2)]
    attn = torch.randn(b * t, heads * hd, device=cuda, generator=g).to(torch.bfloat16)
    q_in = torch.randn(b, t * heads, hd, device=cuda, generator=g).to(torch.bfloat16) * 4
    bias = torch.full((b, 1, keys), MASKED, device=cuda)
    bias[:, :, : prefix_len + t] = 0.0  # the key buffer's alignment padding stays masked
    hidden_in = torch.randn(b * t, cfg.expert_mlp_dim, device=cuda, generator=g).to(torch.bfloat16)
    x2 = x.reshape(b * t, width)

    def calls():
        """label -> (run this product with a kernel or its reference, the tensors it writes)"""
        q = torch.empty(b * t, heads * hd, device=cuda, dtype=torch.bfloat16)
        k, v = cache[0].clone(), cache[1].clone()
        o = torch.empty(b * t, width, device=cuda, dtype=torch.bfloat16)
        h = torch.empty(b * t, cfg.expert_mlp_dim, device=cuda, dtype=torch.bfloat16)
        d = torch.empty(b * t, width, device=cuda, dtype=torch.bfloat16)
        a = torch.empty(b * t * heads, hd, device=cuda, dtype=torch.bfloat16)
        return {
            "attention": (lambda f: f(q_in, cache[0], cache[1], bias, a), lambda: (a,)),
            "qkv_rope": (lambda f: f(x, w.qkv, mods[0], mods[1], cos, sin, q, k, v, prefix_len, heads, cfg.norm_eps),
                         lambda: (q, k[:, prefix_len:prefix_len + t], v[:, prefix_len:prefix_len + t])),
            "o_residual": (lambda f: f(attn, w.o, x2, mods[2], o), lambda: (o,)),
            "geglu": (lambda f: f(x2, w.gate_up, mods[3], mods[4], h, cfg.norm_eps), lambda: (h,)),
            "down_residual": (lambda f: f(hidden_in, w.down, x2, mods[5], d), lambda: (d,)),
        }

    names = {"attention": "attention", "qkv_rope": "qkv_rope", "o_residual": "gated_residual", "geglu": "geglu", "down_residual": "gated_residual"}
    failures = []
    for label, (call, outs) in calls().items():
        kernel, reference = et.KERNELS[names[label]]
        call(kernel)
        got = [o.float().clone() for o in outs()]
        call(reference)
        want = [o.float() for o in outs()]
        err = max(float((a - r).abs().max()) for a, r in zip(got, want))
        mean = max(float((a - r).abs().mean()) for a, r in zip(got, want))
        scale = max(float(r.abs().max()) for r in want)
        t_kernel, t_ref = _time_us(lambda: call(kernel)), _time_us(lambda: call(reference))
        print(f"\n[{torch.cuda.get_device_name(0)}] {label} rows {rows} mlp_fp8 {mlp_fp8}: triton {t_kernel:.1f} us, "
              f"torch {t_ref:.1f} us; max |d| {err:.2e} (|ref| max {scale:.2e}), mean |d| {mean:.2e}")
        if not (err <= 2e-2 * scale and mean <= 2e-3 * scale):
            failures.append((label, err, mean, scale))
    assert not failures, failures


@pytest.mark.parametrize("mlp_fp8", [False, True])
def test_persistent_step_kernel_matches_the_layer_references_at_real_size(big, cuda, mlp_fp8):
    """The whole step's 18 expert layers in one persistent kernel (policy/backends/expert_step.py) against the
    fused kernels' torch references chained, real weights of every layer, bf16 (and the FP8 MLP), a
    544-token prefix; no grid barrier gave up; the same bits on a second launch. Prints both times."""
    from policy.backends import expert_step as es
    from policy.backends import expert_triton as et
    from policy.backends.compiled import MASKED
    from policy.backends.fp8 import E4M3_MAX, Fp8Matrix, quantize
    from policy.backends.fused import fused_weights, precompute_modulations
    from policy.pi05.gemma import rope_cos_sin

    cfg = big.config
    layers = fused_weights(big)["expert"]
    if mlp_fp8:
        def fp8(m):
            s = (m.abs().amax().float() / E4M3_MAX).reshape(())
            return Fp8Matrix(quantize(m, s).contiguous(), s, s)
        layers = [w._replace(gate_up=fp8(w.gate_up), down=fp8(w.down)) for w in layers]
    weights = es.stack_layers(layers)
    t, width, heads, hd, keys, prefix_len = cfg.chunk_size, cfg.expert_width, cfg.num_heads, cfg.head_dim, 576, 544
    g = torch.Generator(device=cuda).manual_seed(3)
    x = torch.randn(1, t, width, device=cuda, generator=g).to(torch.bfloat16)
    mods = precompute_modulations(big, [0.7])[0][0].contiguous()  # (depth, 6, width) at t = 0.7
    cos, sin = (c[:, 0].contiguous() for c in rope_cos_sin(prefix_len + torch.arange(t, device=cuda)[None], hd,
                                                             cfg.rope_theta, torch.bfloat16))
    ks = list(torch.randn(cfg.depth, 1, keys, hd, device=cuda, generator=g).to(torch.bfloat16).unbind(0))
    vs = list(torch.randn(cfg.depth, 1, keys, hd, device=cuda, generator=g).to(torch.bfloat16).unbind(0))
    bias = torch.full((1, 1, keys), MASKED, device=cuda)
    bias[:, :, : prefix_len + t] = 0.0
    args = (x, mods, cos, sin, bias, ks, vs, weights, prefix_len)
    step = es.ExpertStep(heads, cfg.norm_eps)
    assert step.supports(x, ks, vs, weights)
    out = step(*args)
    again = step(*args)
    ref = et.reference_stack(*args, heads=heads, eps=cfg.norm_eps)
    d = (out.float() - ref.float()).abs()
    scale = float(ref.float().abs().max())
    t_step = _time_us(lambda: step(*args))
    layers_only = et.ExpertKernels(heads, cfg.norm_eps, None)
    t_layers = _time_us(lambda: layers_only.stack(*args))
    print(f"\n[{torch.cuda.get_device_name(0)}] persistent step mlp_fp8 {mlp_fp8}: {t_step:.1f} us a step "
          f"(per-layer kernels {t_layers:.1f} us); max |d| {float(d.max()):.2e} (|ref| max {scale:.2e}), mean {float(d.mean()):.2e}")
    assert not step.failed(cuda)
    assert torch.equal(out, again)
    assert float(d.max()) <= 3e-2 * scale and float(d.mean()) <= 3e-3 * scale


@pytest.mark.parametrize("backend,attention", [("compile", "triton"), ("fp8", "triton")])  # bench rows: the rest
def test_samplers_with_triton_expert_kernels_match_eager(big, cuda, backend, attention):
    """The full sampler with expert_kernels="triton" against eager (the issue's accuracy bars: compile vs
    eager mean <= 1.2e-2, fp8 <= 8e-2), every kernel passing its warm-up check, and no sync per call."""
    if backend == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.fail("FP8 needs compute capability 8.9+ (H100/H200 have 9.0)")
    sampler = make_sampler(backend, big, num_steps=10, expert_kernels="triton", expert_attention=attention)
    for batch in (1, 16):
        inputs = _host_masks(example_inputs(big.config, batch, 24, cuda, seed=batch))
        ref = make_sampler("eager", big, num_steps=10)(*inputs)
        out = sampler(*inputs)
        d = (out - ref).abs()
        print(f"\n{backend}:expert_kernels=triton/expert_attention={attention} vs eager, batch {batch}, 10 steps: max {d.max().item():.3e}, "
              f"mean {d.mean().item():.3e}; kernels {sampler.kernel_status}")
        assert torch.isfinite(out).all() and d.mean().item() <= (1.2e-2 if backend == "compile" else 8e-2)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = sampler(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(again, out)
    assert all(s.startswith("ok") for s in sampler.kernel_status.values()), sampler.kernel_status


@pytest.mark.parametrize("backend,persistent", [("compile", False), ("fp8", False), ("compile", True)])
def test_fused_kernels_give_the_same_bits_over_many_graph_replays(big, cuda, backend, persistent):
    """The split-K reductions and the attention's merge run in whichever program finishes a tile last,
    with programmatic dependent launch overlapping neighbouring kernels: a missing barrier or a counter
    left non-zero would show as a call that differs from the first (the sum order is fixed, so correct
    code gives the same bits every time). 300 captured calls of one observation, 10 steps; with `persistent`
    the step kernel, whose grid barriers and counter resets get the same scrutiny."""
    sampler = make_sampler(backend, big, num_steps=10, expert_kernels="triton", expert_persistent=persistent)
    inputs = _host_masks(example_inputs(big.config, 1, 24, cuda, seed=7))
    first = sampler(*inputs)
    assert all(s.startswith("ok") for s in sampler.kernel_status.values()) and sampler.kernel_status
    assert ("step@10" in sampler.kernel_status) == persistent
    differ = sum(not torch.equal(sampler(*inputs), first) for _ in range(300))
    assert differ == 0, f"{differ} of 300 calls differed from the first"
    if persistent:
        assert not sampler._kernels.step.failed(cuda)  # no grid barrier of the step kernel gave up
