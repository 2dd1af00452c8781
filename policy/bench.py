"""Pi0.5 latency benchmark: every backend, batch sizes, denoising steps; parts, memory, accuracy.

    python -m policy.bench                                  # eager and compile, batch 1/16, steps 1/3/10
    python -m policy.bench --backends eager,compile,fp8 --out bench.json
    python -m policy.bench --backends eager,compile,compile:expert_kernels=triton --batch 1 --steps 10
    python -m policy.bench --profile --backends compile --batch 1 --steps 1   # kernel times per stage

Real-size `pi05_libero` with random weights (speed does not depend on the values), 2 cameras (the
third slot masked, as LIBERO), a LIBERO-length prompt. For each backend, batch size and step count:
p50/p95 of a full sample (images, tokens and noise already on the GPU, the masks on the host, as the
policy passes them: the samplers read shapes from host masks without a device sync; the policy's
host-side preprocessing is not included) and of its parts (vision, prefix, denoise loop), timed with CUDA events after warm-up;
warm-up time (compilation and graph capture); peak GPU memory; speed-up over `eager` from the same
run; and the max / mean absolute difference of the actions from `eager` on the same inputs and noise.
A backend spec takes options after a colon, separated by "/": `compile:expert_kernels=triton/attention=sdpa`.
Rows of samplers with fused kernels carry each kernel's check against its torch reference ("kernels").
"""

from __future__ import annotations

import argparse
import json
import sys
import platform
import time

import numpy as np
import torch

from policy.backends import check_options, make_sampler
from policy.pi05.examples import example_inputs
from policy.pi05.weights import random_model


def time_fn(fn, iters: int, warmup: int = 3) -> np.ndarray:
    """Milliseconds of each of `iters` calls after `warmup`: CUDA events on a GPU, else the host clock."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # CPU (the benchmark's own test)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        return np.asarray(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return np.asarray(times)


def parse_backend(spec: str) -> tuple[str, str, dict]:
    """"compile" or "compile:attention=sdpa/compile_mode=max-autotune" -> (label, name, options), the options
    checked against the backend's (policy.backends.check_options: a typo is an error, "0" a False) and
    `rtc` (time real-time chunking's guided sampling) read as a bool."""
    name, _, opts = spec.partition(":")
    if not name:
        raise ValueError(f"backend spec {spec!r} names no backend: NAME[:KEY=VALUE/KEY=VALUE...]")
    options = {}
    for item in filter(None, opts.split("/")):
        key, eq, value = item.partition("=")
        if not (key and eq):
            raise ValueError(f"backend spec {spec!r}: {item!r} is not KEY=VALUE")
        options[key] = value
    rtc = options.pop("rtc", None)
    options = check_options(name, options)
    if rtc is not None:
        low = rtc.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"backend spec {spec!r}: rtc={rtc!r} is not a bool")
        options["rtc"] = low in ("1", "true", "yes", "on")
    return spec, name, options


def profile(spec: str, batch: int, steps: int, prompt_tokens: int, config="pi05_libero", top: int = 30):
    """Kernel-level device time of each stage of one backend, outside CUDA graphs (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    label, name, options = parse_backend(spec)
    device = torch.device("cuda")
    model = random_model(config, device=device, dtype=torch.bfloat16)
    inputs = example_inputs(model.config, batch, prompt_tokens, device)
    sampler = make_sampler(name, model, num_steps=steps, **options)
    stages = sampler.stages(*inputs)
    graphs = {k: float(np.percentile(time_fn(fn, 20), 50)) for k, fn in stages.items()}
    # the stages' kernels one by one (no CUDA graph), so the profiler sees each
    for stage, fn in sampler.stages(*inputs, graphs=False).items():
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        kernel_ms = sum(e.self_device_time_total for e in events) / 1000
        print(f"\n== {label} {stage}: batch {batch}, {steps} steps: as graph {graphs[stage]:.3f} ms, "
              f"sum of kernel times {kernel_ms:.3f} ms")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60))


def warmup_only(spec: str, batch: int, steps: int, prompt_tokens: int, config="pi05_libero") -> float:
    """Seconds from building the sampler to its first result (compilation and graph capture)."""
    label, name, options = parse_backend(spec)
    device = torch.device("cuda")
    model = random_model(config, device=device, dtype=torch.bfloat16)
    inputs = example_inputs(model.config, batch, prompt_tokens, device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    make_sampler(name, model, num_steps=steps, **options)(*inputs)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def warmup_check(spec: str, batch: int, steps: int, prompt_tokens: int) -> dict:
    """Two fresh processes sharing one new compile cache: the first compiles, the second should reuse
    inductor's on-disk cache (what the second job of a sweep gets)."""
    import os
    import subprocess
    import sys
    import tempfile

    times = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        for _ in range(2):
            out = subprocess.run([sys.executable, "-m", "policy.bench", "--warmup-only", "--backends", spec,
                                  "--batch", str(batch), "--steps", str(steps), "--prompt-tokens", str(prompt_tokens)],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:  # the child's own error, not just its exit status
                raise RuntimeError(f"warm-up of {spec} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            times.append(float(out.stdout.strip().splitlines()[-1]))
    return {"backend": spec, "batch": batch, "steps": steps, "first_process_s": times[0], "second_process_s": times[1]}


def measure(name: str, steps: int, options: dict, model, inputs, iters: int, t0: float, warmup: int = 3) -> dict:
    """One backend at one shape: warm-up (from t0), p50/p95 of the full call and of each stage, peak
    memory, the actions, and the fused kernels' checks if it has any."""
    cuda = inputs[4].device.type == "cuda"
    options = dict(options)
    rtc = bool(options.pop("rtc", False))  # time real-time chunking's guided sampling instead
    sampler = make_sampler(name, model, num_steps=steps, **options)
    extra = {"guide": rtc_guide(inputs[4])} if rtc else {}
    actions = sampler(*inputs, **extra).float()
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    full = time_fn(lambda: sampler(*inputs, **extra), iters, warmup)
    parts = {k: time_fn(fn, iters, warmup) for k, fn in sampler.stages(*inputs).items()}
    p50 = {k: float(np.percentile(v, 50)) for k, v in parts.items()}
    row = {
        "p50_ms": float(np.percentile(full, 50)), "p95_ms": float(np.percentile(full, 95)),
        **{f"{k}_p50_ms": v for k, v in p50.items()},
        **{f"{k}_p95_ms": float(np.percentile(v, 95)) for k, v in parts.items()},
        "warmup_s": warmup_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "actions": actions,
    }
    if rtc:  # the guided denoise loop: the full call less the (unguided) vision and prefix stages
        row["rtc_denoise_p50_ms"] = row["p50_ms"] - p50["vision"] - p50["prefix"]
        row["rtc_per_step_ms"] = row["rtc_denoise_p50_ms"] / steps
        row["plain_per_step_ms"] = p50["denoise"] / steps
    kernels = getattr(sampler, "kernel_status", None)  # fused kernels: their checks, and any fallback
    if kernels:
        row["kernels"] = kernels
    return row


def rtc_guide(noise: torch.Tensor, frozen: int = 2, overlap: int = 5):
    """A real-time chunking guide as the runner makes one at replan 5 and 100 ms (2 steps) of latency:
    a previous chunk to continue (random here: the cost does not depend on its values)."""
    from policy.backends.rtc import Guide, prefix_weights

    b, h, dim = noise.shape
    g = torch.Generator(device="cpu").manual_seed(1)
    target = torch.randn(b, h, dim, generator=g).to(noise.device)
    w = prefix_weights(torch.full((b,), frozen), torch.full((b,), overlap), h)[:, :, None].expand(b, h, dim)
    return Guide(target, w.contiguous().to(noise.device))


def bench(backends, batches, steps_list, prompt_tokens, iters, config="pi05_libero", seed=0, device="cuda",
          on_row=None, warmup: int = 3):
    """Rows of measurements (see the module docstring); `on_row(rows)` after each, e.g. to save them."""
    device = torch.device(device)
    model = random_model(config, seed=seed, device=device, dtype=torch.bfloat16)
    cfg = model.config
    rows = []
    for batch in batches:
        images, image_masks, tokens, token_masks, noise = example_inputs(cfg, batch, prompt_tokens, device)
        inputs = [images, [m.cpu() for m in image_masks], tokens, token_masks.cpu(), noise]  # masks as the policy has them
        reference = {}
        for steps in steps_list:
            for spec in backends:
                try:
                    label, name, options = parse_backend(spec)
                except ValueError as exc:  # a bad spec is that row's error (main checks them all before any work)
                    rows.append({"backend": spec, "batch": batch, "steps": steps, "error": f"ValueError: {exc}"})
                    continue
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                if name == "fp8" and "calibration" not in options:
                    # calibrate on representative data (another draw of the benchmark's inputs), as a user would
                    options = dict(options, calibration=[example_inputs(cfg, 1, prompt_tokens, device, seed=seed + 1)[:4]])
                try:
                    row = measure(name, steps, options, model, inputs, iters, t0, warmup)
                except Exception as exc:  # report and go on: one backend must not sink the table
                    rows.append({"backend": label, "batch": batch, "steps": steps, "error": f"{type(exc).__name__}: {exc}"})
                    print(f"{label} batch {batch} steps {steps}: {type(exc).__name__}: {exc}", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                actions = row.pop("actions")
                if label == "eager":
                    reference[steps] = actions
                ref = reference.get(steps)
                diff = (actions - ref).abs() if ref is not None else None
                row = {"backend": label, "batch": batch, "steps": steps, **row,
                       "max_abs_diff_vs_eager": None if diff is None else float(diff.max()),
                       "mean_abs_diff_vs_eager": None if diff is None else float(diff.mean())}
                fallbacks = [k for k, v in row.get("kernels", {}).items() if v.startswith("fallback")]
                if fallbacks:  # the numbers are then not the kernels': an error row (measurements kept in the JSON)
                    row["error"] = f"fused kernels fell back to torch: {', '.join(fallbacks)} (see 'kernels')"
                rows.append(row)
                print(json.dumps(row), flush=True)
                if on_row is not None:
                    on_row(rows)
    eager = {(r["batch"], r["steps"]): r["p50_ms"] for r in rows if r["backend"] == "eager" and "p50_ms" in r}
    for r in rows:
        if "p50_ms" in r and (r["batch"], r["steps"]) in eager:
            r["speedup_vs_eager"] = eager[(r["batch"], r["steps"])] / r["p50_ms"]
    return rows


def table(rows, gpu: str) -> str:
    head = (f"{'backend':<24} {'B':>3} {'steps':>5} {'p50 ms':>8} {'p95 ms':>8} {'vision':>7} {'prefix':>7} "
            f"{'denoise':>8} {'speedup':>8} {'warmup s':>8} {'peak GiB':>8} {'max|d|':>8} {'mean|d|':>8}")
    out = [f"Pi0.5 latency on {gpu} (torch {torch.__version__})", head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['backend']:<24} {r['batch']:>3} {r['steps']:>5}  error: {r['error'][:90]}")
            continue
        d = lambda k: "-" if r.get(k) is None else f"{r[k]:.1e}"  # noqa: E731
        out.append(f"{r['backend']:<24} {r['batch']:>3} {r['steps']:>5} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
                   f"{r['vision_p50_ms']:>7.2f} {r['prefix_p50_ms']:>7.2f} {r['denoise_p50_ms']:>8.2f} "
                   f"{r.get('speedup_vs_eager', float('nan')):>7.2f}x {r['warmup_s']:>8.1f} {'-' if r['peak_gib'] is None else format(r['peak_gib'], '.2f'):>8} "
                   f"{d('max_abs_diff_vs_eager'):>8} {d('mean_abs_diff_vs_eager'):>8}")
    for r in rows:  # fused kernels: each one's check against its torch reference, and any fallback
        for kernel, status in r.get("kernels", {}).items():
            out.append(f"  {r['backend']} B={r['batch']} steps={r['steps']} {kernel}: {status}")
    return "\n".join(out)


def _commit() -> str | None:
    """The project's commit, when run from its checkout (the GPU bundle records it in .COMMIT)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if (root / ".COMMIT").is_file():
        return (root / ".COMMIT").read_text().strip()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except OSError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="eager,compile")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--steps", default="1,3,10")
    p.add_argument("--prompt-tokens", type=int, default=24, help="prompt length incl. BOS and the newline token")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--config", default="pi05_libero")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--profile", action="store_true", help="print kernel times per stage (first backend, batch, steps)")
    p.add_argument("--warmup-check", action="store_true",
                   help="warm-up of a new process with a cold, then a warm compile cache (each backend)")
    p.add_argument("--warmup-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for spec in args.backends.split(","):  # a typo fails now, not after minutes of other backends' compiling
        try:
            parse_backend(spec)
        except ValueError as exc:
            p.error(str(exc))
    if not torch.cuda.is_available():
        p.error("the benchmark needs a CUDA GPU")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    if args.warmup_only:
        print(warmup_only(args.backends, ints(args.batch)[0], ints(args.steps)[0], args.prompt_tokens, args.config))
        return
    if args.warmup_check:
        for spec in args.backends.split(","):
            print(json.dumps(warmup_check(spec, ints(args.batch)[0], ints(args.steps)[0], args.prompt_tokens)))
        return
    if args.profile:
        for spec in args.backends.split(","):
            profile(spec, ints(args.batch)[0], ints(args.steps)[0], args.prompt_tokens, args.config)
        return
    gpu = torch.cuda.get_device_name(0)

    def save(rows):  # after every row: a run cut short still leaves what it measured
        result = {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(), "commit": _commit(),
                  "command": "python -m policy.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "config": args.config, "prompt_tokens": args.prompt_tokens, "cameras": 2, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    rows = bench(args.backends.split(","), ints(args.batch), ints(args.steps), args.prompt_tokens, args.iters,
                 args.config, on_row=save)
    save(rows)  # with the speed-ups
    print(table(rows, gpu))


if __name__ == "__main__":
    main()
