"""Real-time chunking (policy/backends/rtc.py) on the tiny golden Pi0.5: the schedule, the guidance,
and its identity with plain sampling when there is nothing to continue."""

import math
import time

import numpy as np
import pytest
import torch

from policy.backends.eager import EagerSampler
from policy.backends.rtc import Guide, guidance_weight, prefix_weights
from policy.libero_policy import Pi05Policy
from policy.pi05.checkpoints import load_model


def test_prefix_weights_are_the_papers_schedule():
    h, s, d = 10, 5, 2  # chunk 10, execution horizon (replan) 5, delay 2: overlap H - s = 5
    w = prefix_weights(torch.tensor([d]), torch.tensor([h - s]), h)[0].numpy()
    expected = []
    for i in range(h):
        if i < d:
            expected.append(1.0)
        elif i < h - s:
            c = (h - s - i) / (h - s - d + 1)
            expected.append(c * (math.exp(c) - 1) / (math.e - 1))
        else:
            expected.append(0.0)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert w[0] == w[1] == 1 and 0 < w[4] < w[3] < w[2] < 1 and (w[5:] == 0).all()
    rows = prefix_weights(torch.tensor([0, 3]), torch.tensor([0, 7]), 10).numpy()  # per-row settings
    assert (rows[0] == 0).all() and (rows[1, :3] == 1).all() and rows[1, 6] > 0 and (rows[1, 7:] == 0).all()


def test_guidance_weight_is_clipped_where_it_blows_up():
    assert guidance_weight(1.0, 5.0) == 5.0 and guidance_weight(0.5, 5.0) == pytest.approx(2.0)
    assert guidance_weight(0.9, 100.0) == pytest.approx((0.1 ** 2 + 0.9 ** 2) / (0.9 * 0.1))


def test_guided_chunk_continues_the_previous_one_and_unguided_is_plain_sampling(golden_inputs, golden_dir):
    model = load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", dtype=torch.float32)
    images, masks, tokens, token_masks, noise = golden_inputs
    sampler = EagerSampler(model, num_steps=10)
    cache = sampler.encode(images, masks, tokens, token_masks)
    b, h, dim = noise.shape
    previous = sampler.denoise(cache, noise)  # the chunk being executed
    s, d = 5, 2  # replan 5, delay 2 steps
    target = torch.zeros_like(previous)
    target[:, : h - s] = previous[:, s:]  # its actions from the new request's step on
    weights = prefix_weights(torch.full((b,), d), torch.full((b,), h - s), h)[:, :, None].expand(b, h, dim).clone()
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(7))
    plain = sampler.denoise(cache, fresh)
    guided = sampler.denoise(cache, fresh, Guide(target, weights, beta=5.0))
    err_plain = (plain[:, :d] - target[:, :d]).abs().mean().item()
    err_guided = (guided[:, :d] - target[:, :d]).abs().mean().item()
    print(f"\nRTC on the tiny model: mean |a - prev| over the {d} frozen actions: plain {err_plain:.4f}, "
          f"guided {err_guided:.4f}")
    assert err_guided < 0.2 * err_plain
    # past the overlap nothing is guided: those actions still come from the flow
    assert not torch.allclose(guided[:, h - s:], target[:, h - s:], atol=1e-2)
    # nothing to continue (d = 0, no overlap): bit-identical to plain sampling
    none = Guide(target, torch.zeros_like(weights), beta=5.0)
    assert torch.equal(sampler.denoise(cache, fresh, none), plain)


def test_rtc_cost_per_denoising_step_is_measured(golden_inputs, golden_dir):
    model = load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", dtype=torch.float32)
    images, masks, tokens, token_masks, noise = golden_inputs
    sampler = EagerSampler(model, num_steps=10)
    cache = sampler.encode(images, masks, tokens, token_masks)
    guide = Guide(torch.zeros_like(noise), torch.ones_like(noise), beta=5.0)

    def best(fn, n=5):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) / 10 * 1000  # ms per step

    plain, guided = best(lambda: sampler.denoise(cache, noise)), best(lambda: sampler.denoise(cache, noise, guide))
    print(f"\nRTC cost per denoising step, tiny model on this CPU: plain {plain:.2f} ms, guided {guided:.2f} ms "
          f"({guided / plain:.1f}x)")
    assert guided > plain  # the vector-Jacobian product is real work


def test_the_policy_builds_the_guide_from_the_runners_previous_chunk(tiny_checkpoint, spm_tokenizer):
    policy = Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=5, device="cpu", dtype="float32", config="tiny")
    assert policy.supports_rtc
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8),
             "wrist_image": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8),
             "state": rng.normal(size=(2, 8)).astype(np.float32), "prompt": ["pick up the bowl", "open the drawer"],
             "episode": [("s", 0, 0, 7), ("s", 1, 0, 7)], "step": [5, 5]}
    plain = policy.infer(batch)["actions"]
    prev = policy.infer(dict(batch, step=[0, 0]))["actions"]  # what was being executed, in LIBERO units
    rtc = dict(batch, prev_actions=np.concatenate([prev[:, 5:], np.zeros((2, 5, 7))], axis=1),
               prev_frozen=np.array([2, 0]), prev_overlap=np.array([5, 0]))
    guided = policy.infer(rtc)["actions"]
    # row 0 continues its previous chunk over the 2 frozen actions; row 1 has nothing to continue
    assert np.abs(guided[0, :2] - prev[0, 5:7]).mean() < 0.2 * np.abs(plain[0, :2] - prev[0, 5:7]).mean()
    np.testing.assert_allclose(guided[1], plain[1], atol=1e-6)


def test_compile_backend_guides_as_the_eager_one_does(golden_inputs, golden_dir):
    """The compile backend's differentiable expert path (no graphs on the CPU) gives the eager guided
    chunk: same maths through the fused, folded weights."""
    from policy.backends.compiled import CompiledSampler

    model = load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", dtype=torch.float32)
    images, masks, tokens, token_masks, noise = golden_inputs
    b, h, dim = noise.shape
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    weights = prefix_weights(torch.full((b,), 3), torch.full((b,), 6), h)[:, :, None].expand(b, h, dim).clone()
    guide = Guide(target, weights, beta=5.0)
    eager = EagerSampler(model, num_steps=4)(images, masks, tokens, token_masks, noise, guide)
    compiled = CompiledSampler(model, num_steps=4, torch_compile=False, cuda_graphs=False)
    guided = compiled(images, masks, tokens, token_masks, noise, guide)
    assert (guided - eager).abs().max().item() < 1e-4
    plain = compiled(images, masks, tokens, token_masks, noise)
    assert (guided - plain).abs().max().item() > 1e-2  # the guidance did something
