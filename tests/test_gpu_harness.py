"""GPU checks of what runs around the model: batch buckets compiled once before the first episode
(no compilation inside timed calls), and the compiled backend on a second GPU (multi-GPU sweeps).
Run on the device: `pytest -m gpu tests/test_gpu_harness.py` (the `multigpu` ones need 2 GPUs)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def _batch(n, size=224, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "state": rng.normal(size=(n, 8)).astype(np.float32),
            "prompt": ["pick up the black bowl between the plate and the ramekin and place it on the plate"] * n,
            "episode": [("libero_spatial", 0, k, 7) for k in range(n)], "step": [0] * n}


def test_prepared_buckets_mean_no_compilation_or_capture_in_later_calls():
    from torch._dynamo.utils import counters

    from policy.libero_policy import Pi05Policy

    policy = Pi05Policy("random", num_steps=10, device="cuda", backend="compile")
    prepared = policy.prepare(8)
    assert sorted(prepared) == [1, 2, 4, 8]
    states = len(policy.sampler._states)
    frames = sum(counters["stats"].values())
    torch._dynamo.config.error_on_recompile = True  # any recompile now raises inside the call
    try:
        for n in (3, 5, 1, 8, 2, 7, 4, 6):
            out = policy.infer(_batch(n))
            assert out["actions"].shape == (n, 10, 7) and np.isfinite(out["actions"]).all()
            assert out["policy_timing"]["padded_batch"] in prepared
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert len(policy.sampler._states) == states  # no new shape captured
    assert sum(counters["stats"].values()) == frames  # dynamo compiled nothing new
    print(f"\nprepare (compile + capture) per bucket, s: {prepared}")


@pytest.mark.multigpu
@pytest.mark.parametrize("backend", ["compile", "fp8"])
def test_compiled_backends_capture_and_run_on_the_second_gpu(backend):
    assert torch.cuda.device_count() >= 2, "needs 2 GPUs (device kind nvidia-h200-x2)"
    from policy.backends import make_sampler
    from policy.pi05.examples import example_inputs
    from policy.pi05.weights import random_model

    dev = torch.device("cuda:1")
    model = random_model("pi05_libero", seed=0, device=dev, dtype=torch.bfloat16)
    inputs = example_inputs(model.config, 2, 24, dev)
    assert torch.cuda.current_device() == 0  # the sampler must not rely on the current device
    fast = make_sampler(backend, model, num_steps=3)(*inputs)
    eager = make_sampler("eager", model, num_steps=3)(*inputs)
    assert fast.device == dev and torch.isfinite(fast).all()
    diff = (fast.float() - eager.float()).abs().mean().item()
    print(f"\n{backend} on cuda:1 vs eager: mean |d| {diff:.3g}")
    assert diff < (8e-2 if backend == "fp8" else 1.2e-2)


@pytest.mark.multigpu
def test_a_two_job_joblib_sweep_runs_one_job_per_gpu(tmp_path):
    assert torch.cuda.device_count() >= 2, "needs 2 GPUs (device kind nvidia-h200-x2)"
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "runners.sweep", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "policy=pi05",
           "policy.checkpoint=random", "backend=compile", "steps=1,3", "device=auto", "suite=libero_spatial",
           "tasks=[0]", "episodes=2", "max_steps=20", "num_envs=2", "videos=none", f"out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    import json

    devices = {}
    for s in sorted(out.glob("*/summary.json")):
        summary = json.loads(s.read_text())
        assert summary["total"]["errors"] == 0 and summary["total"]["episodes"] == 2
        devices[summary["config"]["steps"]] = (summary["run"]["policy_device"], summary["run"]["worker_environ"])
    # job k on cuda:k, its simulators rendering through EGL on the same GPU
    assert sorted(devices.values()) == [("cuda:0", {"MUJOCO_EGL_DEVICE_ID": "0"}), ("cuda:1", {"MUJOCO_EGL_DEVICE_ID": "1"})]
