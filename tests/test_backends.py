"""Backends against eager on the golden tiny model (fp32, CPU): every backend that runs on a CPU."""

import sys

import pytest
import torch

from policy.backends import BACKENDS, get_backend, make_sampler
from policy.backends.compiled import PROMPT_BUCKETS, CompiledSampler
from policy.pi05.checkpoints import load_model


@pytest.fixture(scope="module")
def tiny(golden_dir):
    return load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def case(golden_inputs, golden_case):
    return golden_inputs, golden_case


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="eager, compile, fp8, tensorrt"):
        get_backend("onnx")
    assert set(BACKENDS) == {"eager", "compile", "fp8", "tensorrt"}


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_eager_backend_is_the_model(tiny, case, steps):
    inputs, c = case
    key = {1: "actions_1step", 3: "actions_3steps", 10: "actions_10steps"}[steps]
    out = make_sampler("eager", tiny, num_steps=steps)(*inputs)
    assert (out - c[f"output.{key}"]).abs().max() <= 1e-4


@pytest.mark.parametrize("steps", [1, 10])
def test_compile_backend_structure_matches_eager_without_inductor(tiny, case, steps):
    """Fused projections, folded norms, precomputed time conditioning, static buffers, prompt buckets."""
    inputs, c = case
    sampler = CompiledSampler(tiny, num_steps=steps, torch_compile=False)
    eager = make_sampler("eager", tiny, num_steps=steps)(*inputs)
    out = sampler(*inputs)
    assert (out - eager).abs().max() <= 1e-5
    assert (out - c[f"output.actions_{'1step' if steps == 1 else '10steps'}"]).abs().max() <= 1e-4
    # the prompt bucket holds the longest prompt (30 tokens -> 32); only two camera slots were encoded
    (shape_key,) = sampler._states
    assert shape_key == (2, (0, 1), PROMPT_BUCKETS[0])


@pytest.mark.parametrize("expert_kernels", ["inductor", "triton"])
def test_compile_backend_with_inductor_matches_eager_with_no_graph_break_or_recompile(tiny, case, expert_kernels):
    """Compile stability as lerobot tests its compiled Pi0.5 (tests/policies/pi0_pi05/utils/torch_compile.py):
    no graph break while compiling, and calls of the same shape reuse what was compiled (CPU, no CUDA graphs;
    "triton": the compiled attention between the fused kernels, which run in Triton's interpreter here)."""
    from torch._dynamo.utils import counters

    inputs, c = case
    torch._dynamo.reset()
    counters.clear()
    rows = {"expert_kernel_rows": 20} if expert_kernels == "triton" else {}  # the golden batch of 2: 20 rows
    sampler = make_sampler("compile", tiny, num_steps=3, expert_kernels=expert_kernels, **rows)
    out = sampler(*inputs)
    if expert_kernels == "triton":
        assert sampler.kernel_status and all(v.startswith("ok") for v in sampler.kernel_status.values())
    assert (out - c["output.actions_3steps"]).abs().max() <= 1e-4
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        # encode/denoise stages compose to the same result, and nothing is compiled again
        again = sampler.denoise(sampler.encode(*inputs[:4]), inputs[4])
        sampler(*inputs)
    assert torch.equal(again, out)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]


def test_samplers_implement_the_sampler_protocol(tiny, case):
    from policy.backends import Sampler

    inputs, _ = case
    for sampler in (make_sampler("eager", tiny, num_steps=1), CompiledSampler(tiny, num_steps=1, torch_compile=False)):
        assert isinstance(sampler, Sampler) and sampler.num_steps == 1
        out = sampler(*inputs)
        for graphs in (True, False):  # the benchmark's public switch (profiling runs the kernels one by one)
            stages = sampler.stages(*inputs, graphs=graphs)
            assert set(stages) == {"vision", "prefix", "denoise"}
            results = {name: stage() for name, stage in stages.items()}
            if sampler.name == "eager":  # the compiled stages write into static buffers and return nothing
                assert torch.allclose(results["denoise"], out, atol=1e-6)
    assert not isinstance(object(), Sampler)


def test_masks_may_stay_on_the_host(tiny, case):
    """The policy has its masks as numpy before upload; the samplers read shapes from them without a device
    round trip (on a GPU: tests/test_gpu.py checks that the call then never syncs)."""
    (images, masks, tokens, tmask, noise), _ = case
    np_masks, np_tmask = [m.numpy() for m in masks], tmask.numpy()
    compiled = CompiledSampler(tiny, num_steps=2, torch_compile=False)
    assert compiled.shape_for(np_masks, np_tmask) == compiled.shape_for(masks, tmask)
    out = compiled(images, np_masks, tokens, np_tmask, noise)
    assert torch.equal(out, compiled(images, masks, tokens, tmask, noise))
    eager = make_sampler("eager", tiny, num_steps=2)
    assert (eager(images, np_masks, tokens, np_tmask, noise) - out).abs().max() <= 1e-5


def test_prepare_captures_a_shape_without_inputs(tiny):
    sampler = CompiledSampler(tiny, num_steps=1, torch_compile=False)
    sampler.prepare(3, slots=(1, 0), prompt_tokens=40)
    assert set(sampler._states) == {(3, (0, 1), 64)}


def test_eager_denoise_loop_never_reads_a_tensor_on_the_host(tiny, case, monkeypatch):
    """House style: no tensor comparison per Euler step (on a GPU each one is a sync)."""
    inputs, c = case
    cache = tiny.prefill(tiny.embed_prefix(*inputs[:4]))
    assert cache.suffix_key_valid is not None  # the golden batch has padded prompt tokens

    def no_host_reads(*args):
        raise AssertionError("a tensor was read on the host inside the denoise loop")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_host_reads)
    actions = tiny.denoise(cache, inputs[4], 10)
    monkeypatch.undo()
    assert (actions - c["output.actions_10steps"]).abs().max() <= 1e-4


def test_example_inputs_are_seeded_and_shaped_as_libero_feeds_the_model(tiny):
    from policy.pi05.examples import example_inputs

    cfg = tiny.config
    images, masks, tokens, tmask, noise = example_inputs(cfg, batch=2, prompt_tokens=12, seed=3)
    again = example_inputs(cfg, batch=2, prompt_tokens=12, seed=3)
    assert torch.equal(images[0], again[0][0]) and torch.equal(noise, again[4])
    assert [m.tolist() for m in masks] == [[True, True], [True, True], [False, False]] and (images[2] == -1).all()
    assert tokens.shape == (2, cfg.max_token_len) and tmask.sum(1).tolist() == [12, 12] and (tokens[:, 0] == 2).all()
    assert noise.shape == (2, cfg.chunk_size, cfg.action_dim)
    _, _, fixed, fixed_mask, _ = example_inputs(cfg, batch=2, prompt_ids=[2, 7, 9])
    assert fixed[:, :4].tolist() == [[2, 7, 9, 0]] * 2 and fixed_mask.sum().item() == 6


def test_compile_backend_handles_long_prompts_and_single_rows(tiny, case):
    (images, masks, tokens, tmask, noise), _ = case
    sampler = CompiledSampler(tiny, num_steps=2, torch_compile=False)
    long_mask = torch.zeros_like(tmask)
    long_mask[:, :150] = True
    long_tokens = torch.where(long_mask, torch.randint(3, 1000, tokens.shape), 0)
    out = sampler(images, masks, long_tokens, long_mask, noise)
    ref = make_sampler("eager", tiny, num_steps=2)(images, masks, long_tokens, long_mask, noise)
    assert (out - ref).abs().max() <= 1e-5 and (2, (0, 1), 200) in sampler._states
    one = sampler([x[:1] for x in images], [m[:1] for m in masks], tokens[:1], tmask[:1], noise[:1])
    assert (one - ref[:1]).abs().max() > 0  # a different prompt: different actions
    ref1 = make_sampler("eager", tiny, num_steps=2)([x[:1] for x in images], [m[:1] for m in masks], tokens[:1], tmask[:1], noise[:1])
    assert (one - ref1).abs().max() <= 1e-5


def test_cuda_graphs_need_a_gpu(tiny):
    with pytest.raises(ValueError, match="CUDA"):
        CompiledSampler(tiny, cuda_graphs=True, torch_compile=False)


def test_fp8_quantization_emulated_on_the_cpu_stays_close_to_eager(tiny, case):
    from policy.backends.fp8 import FP8_MATRICES, Fp8Matrix, Fp8Sampler

    inputs, _ = case
    sampler = Fp8Sampler(tiny, num_steps=10, emulate=True, calibration=[inputs[:4]])
    quantized = [(k, i, name) for k, names in FP8_MATRICES.items() for i in range(len(sampler.weights[k]))
                 for name in names]
    unused = {("prefix", 1, "o"), ("prefix", 1, "gate_up"), ("prefix", 1, "down")}  # the last prefix layer only makes K/V
    assert set(sampler.amax) == set(quantized) - unused
    for kind, i, name in sorted(sampler.amax):
        m = getattr(sampler.weights[kind][i], name)
        assert isinstance(m, Fp8Matrix) and m.w8.dtype == torch.float8_e4m3fn and m.w_scale > 0 and m.x_scale > 0
    # what stays bf16 is named too: the expert's attention, the vision biases
    assert not isinstance(sampler.weights["expert"][0].qkv, Fp8Matrix)
    assert not isinstance(sampler.weights["vision"][0].qkv_b, Fp8Matrix)
    out = sampler(*inputs)
    ref = make_sampler("eager", tiny, num_steps=10)(*inputs)
    err = (out - ref).abs()
    print(f"fp8 (emulated) vs eager, tiny model: max {err.max():.3e}, mean {err.mean():.3e}")
    assert 0 < err.mean() < 0.1 and err.max() < 0.5  # FP8 moves the result, but not far


def test_fp8_default_calibration_uses_the_shipped_prompt_through_a_tokenizer(tiny, spm_tokenizer, tmp_path):
    from policy.backends.fp8 import CALIBRATION_DIR, default_calibration
    from policy.pi05.tokenizer import PaligemmaTokenizer

    prompt = (CALIBRATION_DIR / "prompt.txt").read_text()
    ids = PaligemmaTokenizer(spm_tokenizer).ids(prompt)
    ((images, masks, tokens, tmask),) = default_calibration(tiny, tokenizer=spm_tokenizer)
    assert tokens[0, : len(ids)].tolist() == ids and int(tmask.sum()) == len(ids)
    assert [bool(m) for m in masks] == [True, True, False] and images[0].shape == (1, 3, 224, 224)
    # without a tokenizer file: random ids of a LIBERO-like length, the same frames
    ((images2, _, tokens2, tmask2),) = default_calibration(tiny, tokenizer=tmp_path / "missing.model")
    assert int(tmask2.sum()) == 24 and torch.equal(images2[0], images[0])


def test_fp8_refuses_devices_without_fp8(tiny):
    from policy.backends.fp8 import Fp8Sampler

    with pytest.raises(RuntimeError, match="use backend=compile|Use backend=compile"):
        Fp8Sampler(tiny, num_steps=1)


def test_tensorrt_backend_without_torch_tensorrt_says_how_to_install(tiny, monkeypatch):
    from policy.backends.tensorrt import TensorRTSampler

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # missing, whether or not it is installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tensorrt\]'") as info:
        TensorRTSampler(tiny, num_steps=1)
    assert isinstance(info.value.__cause__, ImportError)


def test_tensorrt_stage_modules_equal_the_model(tiny, case):
    """The modules TensorRT would compile compute exactly what the eager model does."""
    from policy.backends.tensorrt import PrefixStage, VisionStage

    (images, masks, tokens, tmask, noise), _ = case
    assert torch.allclose(VisionStage(tiny)(images[0]), tiny.embed_images([images[0]])[0], atol=1e-6)
    prefix = tiny.embed_prefix(images, masks, tokens, tmask, compact=False)
    ks, vs = PrefixStage(tiny)(prefix.embs, prefix.valid)
    cache = tiny.prefill(prefix)
    valid = prefix.valid
    assert ks.shape == (2, 2, 968, 16)
    for i in range(2):
        assert (ks[i][valid] - cache.k[i][:, 0][valid]).abs().max() < 1e-5
        assert (vs[i][valid] - cache.v[i][:, 0][valid]).abs().max() < 1e-5


def test_bench_rows_report_accuracy_kernel_checks_and_errors_and_go_on():
    """The benchmark's plumbing on the CPU (the GPU run is rare): rows with stages and accuracy against
    eager, the fused kernels' checks, an error row for a bad option, a row for a kernel that fell back."""
    from policy import bench
    from policy.backends import expert_triton as et

    specs = ["eager", "compile:torch_compile=false/expert_kernels=triton", "compile:no_such_option=1"]
    rows = bench.bench(specs, [1], [1], 24, 1, config="tiny", device="cpu", warmup=0)
    eager, fused, bad = rows
    assert eager["mean_abs_diff_vs_eager"] == 0 and {"vision_p50_ms", "prefix_p50_ms", "denoise_p50_ms"} <= set(eager)
    assert fused["mean_abs_diff_vs_eager"] < 1e-2 and "error" not in fused
    assert sorted(fused["kernels"]) == ["down_residual@10", "geglu@10", "o_residual@10", "qkv_rope@10"]
    assert "has no option 'no_such_option'" in bad["error"]
    text = bench.table(rows, "cpu")
    assert "error: ValueError" in text and "geglu@10: ok" in text

    def broken(*args, **kw):
        raise RuntimeError("ptxas died")

    et.KERNELS["geglu"], saved = (broken, et.geglu_reference), et.KERNELS["geglu"]
    try:
        (row,) = bench.bench(specs[1:2], [1], [1], 24, 1, config="tiny", device="cpu", warmup=0)
    finally:
        et.KERNELS["geglu"] = saved
    assert "fell back" in row["error"] and row["kernels"]["geglu@10"].startswith("fallback: RuntimeError: ptxas died")


def test_backend_options_are_checked_by_name_and_read_as_their_types(capsys):
    """A typo in an option must fail before any weights are read or any backend compiled, and a bench spec's
    strings must not turn a bool on ("0" is a non-empty string): cuda_graphs=0 measured graphs before."""
    from policy import bench
    from policy.backends import backend_options, check_options

    assert {"expert_kernels", "torch_compile", "cuda_graphs"} <= set(backend_options("fp8"))  # compile's, through **options
    assert "precision" in backend_options("tensorrt") and backend_options("eager") == {}
    assert check_options("compile", {"cuda_graphs": "0", "torch_compile": "no", "expert_kernel_rows": "20",
                                     "compile_mode": "none", "expert_kernels": "triton"}) == {
        "cuda_graphs": False, "torch_compile": False, "expert_kernel_rows": 20, "compile_mode": None, "expert_kernels": "triton"}
    assert check_options("compile", {"torch_compile": True}) == {"torch_compile": True}  # typed values (Hydra's) pass
    with pytest.raises(ValueError, match="no option 'expert_kernel'; did you mean expert_kernels"):
        check_options("fp8", {"expert_kernel": "triton"})
    with pytest.raises(ValueError, match="option cuda_graphs='maybe' is not a valid bool"):
        check_options("compile", {"cuda_graphs": "maybe"})
    with pytest.raises(ValueError, match="expert_kernel_rows='ten' is not a valid int"):
        check_options("compile", {"expert_kernel_rows": "ten"})
    assert bench.parse_backend("compile:cuda_graphs=0/rtc=0")[2] == {"cuda_graphs": False, "rtc": False}
    for spec, why in (("compile:expert_kernels", "is not KEY=VALUE"), (":x=1", "names no backend"),
                      ("eager:rtc=maybe", "rtc='maybe' is not a bool"), ("eager:steps=3", "has no option 'steps'")):
        with pytest.raises(ValueError, match=why):
            bench.parse_backend(spec)
    with pytest.raises(SystemExit):  # the command refuses before it looks for a GPU or builds a model
        bench.main(["--backends", "eager,compile:whole_stp=false"])
    assert "no option 'whole_stp'; did you mean whole_step" in capsys.readouterr().err


def test_bench_times_real_time_chunking_against_plain_sampling():
    from policy import bench

    rows = bench.bench(["eager", "eager:rtc=true", "compile:torch_compile=false/rtc=true"], [1], [3], 24, 1,
                       config="tiny", device="cpu", warmup=0)
    plain, rtc, rtc_compile = rows
    assert "rtc_per_step_ms" not in plain
    for row in (rtc, rtc_compile):
        assert "error" not in row and row["rtc_per_step_ms"] > 0 and row["plain_per_step_ms"] > 0
        assert row["mean_abs_diff_vs_eager"] > 0  # guided towards another chunk: not the plain actions
