"""GPU checks (H100/H200), run on the device with `pytest -m gpu -s`: the real-size model in bf16,
bf16-vs-fp32 agreement, every backend against eager, and the golden parity on the GPU."""

import pytest
import torch
from safetensors.torch import load_file

from policy.backends import make_sampler
from policy.bench import make_inputs
from policy.pi05.config import CAMERA_SLOTS
from policy.pi05.checkpoints import load_model
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
    inputs = make_inputs(big.config, batch, 24, cuda)
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
    inputs = make_inputs(big.config, 2, 24, cuda)
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
        inputs = make_inputs(big.config, batch, 24, cuda, seed=batch)
        ref = make_sampler("eager", big, num_steps=10)(*inputs)
        out = make_sampler(backend, big, num_steps=10)(*inputs)
        d = (out - ref).abs()
        print(f"\n{backend} vs eager, batch {batch}, 10 steps: max {d.max().item():.3e}, mean {d.mean().item():.3e}")
        assert torch.isfinite(out).all() and d.mean().item() < (0.05 if backend == "compile" else 0.15)


def test_golden_parity_on_the_gpu(golden_dir, cuda):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    case = load_file(str(golden_dir / "tiny_case.safetensors"), device="cuda")
    model = load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", device=cuda, dtype=torch.float32)
    images = [case[f"input.image.{s}"] for s in CAMERA_SLOTS]
    masks = [case[f"input.image_mask.{s}"] for s in CAMERA_SLOTS]
    args = (images, masks, case["input.tokenized_prompt"], case["input.tokenized_prompt_mask"])
    for n, key in ((1, "actions_1step"), (10, "actions_10steps")):
        a = model.sample_actions(*args, noise=case["input.noise"], num_steps=n)
        err = (a - case[f"output.{key}"]).abs().max().item()
        c = make_sampler("compile", model, num_steps=n)(*args, case["input.noise"])
        cerr = (c - case[f"output.{key}"]).abs().max().item()
        print(f"\nGPU fp32 parity, {n} steps: eager {err:.2e}, compile {cerr:.2e}")
        assert err <= 1e-4 and cerr <= 1e-4
