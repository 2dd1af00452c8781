"""One denoising step's 18 action-expert layers at real size, as a CUDA graph, per implementation: the
compile backend's inductor layer (the baseline) and the fused Triton kernels (policy/backends/
expert_triton.py) with and without programmatic dependent launch, with the compiled or the Triton
attention; optionally an older copy of the kernel module for an A/B in the same process. Prints a table
(us per step and per layer, against the bandwidth floor of the weights), each variant's difference from
the baseline's output, and a kernel-by-kernel profile of the first Triton variant's graph replays.

    python scripts/gpu/expert_step_bench.py --rows 10 --out /tmp/expert_step.json [--old path/to/expert_triton.py]

Random weights with the expert's shapes (pi05_libero: width 1024, 8 heads of 256, MLP 4096, 18 layers),
a 544-token prefix in a 576-key cache, bf16. Development tool for issue 19 (not part of the test suite).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy.backends import expert_step as es  # noqa: E402
from policy.backends import expert_triton as et  # noqa: E402
from policy.backends.compiled import MASKED, attention_fn, expert_stack  # noqa: E402
from policy.backends.fused import ExpertWeights  # noqa: E402
from policy.pi05.config import get_config  # noqa: E402
from policy.pi05.gemma import rope_cos_sin  # noqa: E402

STEP_CONFIGS = {  # alternatives to the step kernel's defaults (expert_step.WIDTHS / MAX_BK ...), same process
    "q|k|v tiles of 32 columns": {"WIDTHS": {"Q": 32, "O": 32, "G": 32, "D": 32}},
    "GEGLU K slices of 512": {"MAX_BK": {"Q": 256, "G": 512, "O": 1024, "D": 1024}},
}
ATTN_CONFIGS = {  # alternatives to the attention kernel's (ATTN_BLOCK_Q, ATTN_BLOCK_S, ATTN_WARPS) = (16, 64, 8)
    "attention 16 x 128 keys": {"ATTN_BLOCK_Q": 16, "ATTN_BLOCK_S": 128, "ATTN_WARPS": 8},
    "attention 16 x 32 keys, 4 warps": {"ATTN_BLOCK_Q": 16, "ATTN_BLOCK_S": 32, "ATTN_WARPS": 4},
    "attention 32 x 64 keys": {"ATTN_BLOCK_Q": 32, "ATTN_BLOCK_S": 64, "ATTN_WARPS": 8},
}
BANDWIDTH = 4.3e12  # bytes/s: a device-to-device copy on these H200s (KINDS.md)


def make_problem(rows: int, seed: int = 0):
    cfg = get_config("pi05_libero")
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(seed)
    w_, h, hd, mlp, depth = cfg.expert_width, cfg.num_heads, cfg.head_dim, cfg.expert_mlp_dim, cfg.depth

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dt)

    weights = es.stack_layers([ExpertWeights(qkv=rnd((h + 2) * hd, w_, scale=w_ ** -0.5),
                                             o=rnd(w_, h * hd, scale=(h * hd) ** -0.5),
                                             gate_up=rnd(2 * mlp, w_, scale=w_ ** -0.5), down=rnd(w_, mlp, scale=mlp ** -0.5))
                               for _ in range(depth)])  # as the samplers hold them: one (depth, N, K) tensor per kind
    b, t = rows // cfg.chunk_size, cfg.chunk_size
    prefix_len, keys = 544, 576
    mods = torch.randn(depth, 6, w_, device=dev, generator=g) * 0.3
    ks = list(rnd(depth, b, keys, hd).unbind(0))  # one cache tensor, a view per layer (as the samplers)
    vs = list(rnd(depth, b, keys, hd).unbind(0))
    bias = torch.full((b, 1, keys), MASKED, device=dev)
    bias[:, :, : prefix_len + t] = 0.0
    pos = prefix_len + torch.arange(t, device=dev).expand(b, t)
    cos, sin = (c[:, 0].contiguous() for c in rope_cos_sin(pos, hd, cfg.rope_theta, dt))
    x = rnd(b, t, w_)
    return dict(cfg=cfg, weights=weights, mods=mods, ks=ks, vs=vs, bias=bias, cos=cos, sin=sin, x=x,
                prefix_len=prefix_len, weight_bytes=sum(sum(m.numel() * m.element_size() for m in lw) for lw in weights))


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def variants(p, old_path: str | None, step_configs: bool = False, attn_configs: bool = False):
    cfg = p["cfg"]
    heads, hd, eps = cfg.num_heads, cfg.head_dim, cfg.norm_eps
    compiled_attn = torch.compile(functools.partial(attention_fn, heads=heads, impl="matmul"), fullgraph=True, dynamic=False)
    inductor = torch.compile(functools.partial(expert_stack, heads=heads, hd=hd, eps=eps, prefix_len=p["prefix_len"]),
                             fullgraph=True, dynamic=False)
    out = {"inductor (compile backend)": lambda x: inductor(x, p["mods"], p["cos"], p["sin"], p["bias"], p["ks"], p["vs"],
                                                          p["weights"])}

    def kernels(module, attention, pdl=True, persistent=False, step_config=None, sleep=True, attn_config=None):
        fused = (es.StepKernels if persistent else module.ExpertKernels)(heads, eps, attention)
        if persistent:
            fused.step.sleep_between_polls = sleep

        def run(x):
            if hasattr(module, "use_pdl"):
                module.use_pdl = pdl
            # the launchers read these module constants at call time
            patches = [(es, k, v) for k, v in (step_config or {}).items()] + [(module, k, v) for k, v in (attn_config or {}).items()]
            saved = [(mod, k, getattr(mod, k)) for mod, k, _ in patches]
            for mod, k, v in patches:
                setattr(mod, k, v)
            try:
                return fused.stack(x, p["mods"], p["cos"], p["sin"], p["bias"], p["ks"], p["vs"], p["weights"], p["prefix_len"])
            finally:
                for mod, k, v in saved:
                    setattr(mod, k, v)
        run.status = fused.status
        return run

    out["persistent step kernel"] = kernels(et, None, persistent=True)
    out["persistent step kernel, barrier spins without sleeping"] = kernels(et, None, persistent=True, sleep=False)
    for label, config in (STEP_CONFIGS if step_configs else {}).items():
        out[f"persistent step kernel, {label}"] = kernels(et, None, persistent=True, step_config=config)
    out["triton, triton attention, PDL"] = kernels(et, None, True)
    out["triton, triton attention, no PDL"] = kernels(et, None, False)
    out["triton, compiled attention, PDL"] = kernels(et, compiled_attn, True)
    for label, config in (ATTN_CONFIGS if attn_configs else {}).items():
        out[f"triton, {label}, PDL"] = kernels(et, None, True, attn_config=config)
    if old_path:
        old = load_module(old_path, "expert_triton_old")
        out["old triton, compiled attention"] = kernels(old, compiled_attn)
        out["old triton, triton attention"] = kernels(old, None)
    return out


def time_graph(fn, x, iters: int = 200):
    """Capture fn(x) as a CUDA graph and time its replays with events (us per replay: median of 5 rounds)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn(x)
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(rounds), g, y


def trace_step(p, reps: int = 20) -> dict:
    """The step kernel's own timeline: every program's arrival time (%globaltimer) at every barrier, over
    `reps` launches. Per stage kind: the critical path (release to release), and when the first, the
    median and the last program finished after the previous release (us, mean over layers and launches)."""
    cfg = p["cfg"]
    fused = es.StepKernels(cfg.num_heads, cfg.norm_eps, None)
    args = (p["x"], p["mods"], p["cos"], p["sin"], p["bias"], p["ks"], p["vs"], p["weights"], p["prefix_len"])
    fused.stack(*args)
    step = fused.step
    nprog, nbar = step.programs(p["x"].device), cfg.depth * es.STAGES
    step.trace = torch.zeros(nprog, nbar, dtype=torch.int64, device=p["x"].device)
    runs = []
    for _ in range(reps):
        fused.stack(*args)
        torch.cuda.synchronize()
        runs.append(step.trace.clone())
    t = torch.stack(runs).double() / 1000  # (reps, programs, barriers) us
    release = t.max(1).values  # (reps, barriers)
    prev = torch.cat([release[:, :1] * 0 + float("nan"), release[:, :-1]], dim=1)
    out = {"programs": nprog, "us_first_to_last_release": float((release[:, -1] - release[:, 0]).mean())}
    for i, kind in enumerate("QAOGD"):
        cols = list(range(i, nbar, es.STAGES))
        if i == 0:
            cols = cols[1:]  # the first layer's Q has no previous release in the kernel
        d = t[:, :, cols] - prev[:, None, cols]
        out[kind] = {"critical_us": float((release[:, cols] - prev[:, cols]).mean()),
                     "first_us": float(d.min(1).values.mean()), "median_us": float(d.median(1).values.mean()),
                     "last_us": float(d.max(1).values.mean())}
    return out


def profile_graph(g, top: int = 12):
    from torch.profiler import ProfilerActivity, profile

    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            g.replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / 10, e.count // 10) for e in prof.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return [{"kernel": k[:90], "us_per_step": round(t, 2), "launches_per_step": c} for k, t, c in rows[:top]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10, help="action tokens x batch (10: one observation)")
    ap.add_argument("--old", help="an older expert_triton.py to time in the same process")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--step-configs", action="store_true", help="also time the step kernel's STEP_CONFIGS alternatives")
    ap.add_argument("--attn-configs", action="store_true", help="also time the attention kernel's ATTN_CONFIGS alternatives")
    args = ap.parse_args(argv)
    p = make_problem(args.rows)
    floor_us = p["weight_bytes"] / BANDWIDTH * 1e6
    results, ref, profiled = [], None, None
    for name, fn in variants(p, args.old, args.step_configs, args.attn_configs).items():
        try:
            us, g, y = time_graph(fn, p["x"])
        except Exception as exc:  # one broken variant must not lose the others' numbers
            print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            results.append({"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        y = y.float()
        ref = y if ref is None else ref
        d = (y - ref).abs()
        row = {"variant": name, "us_per_step": round(us, 1), "us_per_layer": round(us / p["cfg"].depth, 2),
               "x_floor": round(us / floor_us, 2), "max_abs_diff_vs_inductor": float(d.max()),
               "mean_abs_diff_vs_inductor": float(d.mean()), "kernels": dict(getattr(fn, "status", {}))}
        if name.startswith("triton"):  # with PDL a kernel's device time includes its wait; without, it is its own
            row["profile"] = profile_graph(g)
            profiled = profiled or {}
            profiled[name] = row["profile"]
        results.append(row)
        print(f"{name:40s} {us:8.1f} us/step {us / p['cfg'].depth:6.2f} us/layer {us / floor_us:5.2f}x floor  "
              f"max|d| {float(d.max()):.2e} mean|d| {float(d.mean()):.2e}", flush=True)
    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": args.rows,
               "weight_mb_per_step": p["weight_bytes"] / 1e6, "floor_us_per_step": floor_us, "pdl": et.pdl_supported(torch.device("cuda")),
               "pdl_error": et._PDL_BROKEN[:1], "results": results}
    try:
        summary["step_trace"] = trace = trace_step(p)
        print(f"\nstep kernel timeline ({trace['programs']} programs): first to last release {trace['us_first_to_last_release']:.1f} us")
        for kind in "QAOGD":
            r = trace[kind]
            print(f"  {kind}: critical {r['critical_us']:6.2f} us; programs done after the release: first {r['first_us']:6.2f}, "
                  f"median {r['median_us']:6.2f}, last {r['last_us']:6.2f} us")
    except Exception as exc:
        print(f"step trace FAILED {type(exc).__name__}: {str(exc)[:300]}")
    for name, prof in (profiled or {}).items():
        print(f"\nkernels of {name} (device us per step):")
        for r in prof:
            print(f"  {r['us_per_step']:8.2f} us  x{r['launches_per_step']:<3d} {r['kernel']}")
    # the block shapes autotune chose per (M, N, K): which split each product ran with
    summary["tuned"] = {getattr(fn, "__name__", str(fn)): {str(key): str(cfg) for key, cfg in getattr(tuned, "cache", {}).items()}
                        for fn, tuned in et._TUNED.items()}
    print("\nautotuned block shapes:", json.dumps(summary["tuned"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
