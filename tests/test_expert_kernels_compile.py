"""The fused expert kernels (policy/backends/expert_triton.py) compiled for Hopper (sm_90) on the CPU:
Triton's compiler needs no GPU. The interpreter tests (tests/test_expert_kernels.py) check the maths;
these check that the kernels build for the GPU at all (the interpreter accepts code the compiler
rejects, e.g. a plain-assigned constexpr) and that the PTX does what the design relies on: weights
loaded with 16-byte vector loads BEFORE `griddepcontrol.wait` (programmatic dependent launch), the
activations after it. Run in a subprocess because the test session imports Triton in interpreter mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policy.backends import expert_triton as et

ROOT = Path(__file__).resolve().parents[1]

COMPILE = r"""
import itertools, json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from policy.backends import expert_triton as et

P, F, I = "*bf16", "*fp32", "*i32"
PTRS = {"w_scale_ptr": F, "gate_ptr": F, "scale_ptr": F, "shift_ptr": F, "ws_ptr": F, "cnt_ptr": I, "bias_ptr": F}
INTS = {"M": "i32", "N": "i32", "T": "i32", "KEYS": "i32", "prefix_len": "i32", "eps": "fp32", "RB": "i32", "S": "i32",
        "R": "i32", "own_start": "i32", "own_end": "i32", "sm_scale": "fp32"}
LOAD = re.compile(r"\bld\.global|\bcp\.async")

def build(fn, consts, warps, stages, w_type=P):
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n.endswith("_ptr"):
            sig[n] = w_type if n == "w_ptr" else PTRS.get(n, P)
            attrs[(i,)] = [["tt.divisibility", 16]]  # what a launch with torch's (256-byte aligned) tensors gets
        elif n in INTS and n not in consts:
            sig[n] = INTS[n]
        else:
            sig[n] = "constexpr"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    lines = [l.strip() for l in k.asm["ptx"].splitlines()]
    waits = [i for i, l in enumerate(lines) if l.startswith("griddepcontrol.wait")]
    labels = [i for i, l in enumerate(lines) if l.startswith("$L__BB") and l.endswith(":")]
    loads = [i for i, l in enumerate(lines) if LOAD.search(l)]
    # per wait, the 16-byte loads in the same basic block before it (what is in flight while it waits)
    block_v4 = [sum(max([j for j in labels if j < w], default=0) < i < w and "ld.global.v4" in lines[i] for i in loads)
                for w in waits]
    return {"waits": len(waits), "loads_before_first_wait": sum(i < waits[0] for i in loads) if waits else 0,
            "loads_after_last_wait": sum(i > waits[-1] for i in loads) if waits else len(loads),
            "v4_in_block_before_wait": max(block_v4, default=0), "threads": 32 * warps,
            "launch_dependents": any(l.startswith("griddepcontrol.launch_dependents") for l in lines)}

out = {}
kernels = {"gated_residual": (et._gated_residual_kernel, dict(K=4096), 1),
           "geglu": (et._geglu_kernel, dict(K=1024, GELU_C=et.GELU_C), 2),
           "qkv_rope": (et._qkv_rope_kernel, dict(K=1024, NQ=8, HD=256), 2)}
for name, (fn, extra, tiles) in kernels.items():
    for i, c in enumerate(et.CONFIGS):
        for fp8 in ([False, True] if i in (0, 4) else [False]):
            kw = c.kwargs
            consts = dict(extra, W_FP8=fp8, IEEE=False, PDL=True, **kw)
            info = build(fn, consts, c.num_warps, c.num_stages, "*fp8e4nv" if fp8 else P)
            # the weight tile(s) a split-K program prefetches, in 16-byte loads per thread
            info["weight_v4"] = kw["BLOCK_N"] * kw["BLOCK_K"] * (1 if fp8 else 2) * tiles // (16 * info["threads"])
            info["split"] = kw["SPLIT_K"]
            out[f"{name}/{i}{'-fp8' if fp8 else ''}"] = info
out["attention"] = build(et._attention_kernel, dict(HD=256, IEEE=False, PDL=True, BLOCK_Q=16, BLOCK_S=et.ATTN_BLOCK_S),
                         et.ATTN_WARPS, 1)
out["attention"]["kv_v4"] = 2 * et.ATTN_BLOCK_S * 256 * 2 // (16 * out["attention"]["threads"])
out["gated_residual/no-pdl"] = build(et._gated_residual_kernel, dict(K=4096, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=True,
                                                                     W_FP8=False, IEEE=False, PDL=False), 4, 1)
from policy.backends import expert_step as es
STEP_PTRS = {"sqkv_ptr": F, "so_ptr": F, "sgu_ptr": F, "sd_ptr": F, "mods_ptr": F, "bias_ptr": F, "ws_ptr": F,
             "cnt_ptr": I, "bar_ptr": I, "err_ptr": I, "trace_ptr": "*i64"}
STEP_INTS = {"M": "i32", "T": "i32", "KEYS": "i32", "prefix_len": "i32", "eps": "fp32", "sm_scale": "fp32", "s_stride": "i32"}
for fp8 in (False, True):
    fn, sig, attrs = es._step_kernel, {}, {}
    for i, n in enumerate(fn.arg_names):
        if n.endswith("_ptr"):
            sig[n] = "*fp8e4nv" if fp8 and n in ("wgu_ptr", "wd_ptr") else STEP_PTRS.get(n, P)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in STEP_INTS:
            sig[n] = STEP_INTS[n]
        else:
            sig[n] = "constexpr"
    consts = dict(DEPTH=18, WIDTH=1024, MLP=4096, NQ=8, HD=256, F8_QKV=False, F8_O=False, F8_GU=fp8, F8_D=fp8, IEEE=False,
                  GELU_C=et.GELU_C, BLOCK_M=es.BLOCK_M, ATT_BQ=et.ATTN_BLOCK_Q, ATT_BS=et.ATTN_BLOCK_S, BAR=2, TRACE=True,
                  **es.stage_blocks(1024, 4096, 8, 256, 132))
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": es.WARPS, "num_stages": 1})
    ptx = k.asm["ptx"]
    out[f"step{'-fp8' if fp8 else ''}"] = {"release": len(re.findall(r"atom[.a-z]*\.release", ptx)),
                                           "acquire": len(re.findall(r"ld\.acquire\.gpu", ptx)),
                                           "volatile_polls": len(re.findall(r"ld\.volatile", ptx)),
                                           "sleeps": ptx.count("nanosleep"), "timer": ptx.count("%globaltimer")}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_hopper_with_programmatic_dependent_launch(ptx):
    """Every configuration autotuning may pick, bf16 and FP8 weights."""
    assert len([k for k in ptx if not k.startswith("step")]) == 3 * (len(et.CONFIGS) + 2) + 2
    for name, info in ptx.items():
        if name.startswith("step"):
            continue
        if name.endswith("no-pdl"):
            assert info["waits"] == 0 and not info["launch_dependents"], name
        else:
            assert info["waits"] >= 1 and info["launch_dependents"], name


def test_split_k_kernels_prefetch_their_weight_tiles_before_the_wait(ptx):
    """A split-K program issues its whole weight tile (all of it: >= the tile's 16-byte loads per thread)
    in the block that ends with the wait, and loads the activations after it; a K-loop program (more
    rows) loads nothing before the wait, not even an asynchronous copy."""
    for name, info in ptx.items():
        if name.startswith("step"):
            continue
        if info.get("split"):
            assert info["v4_in_block_before_wait"] >= info["weight_v4"] > 0, (name, info)
            assert info["loads_after_last_wait"] > 0, (name, info)
        elif "split" in info:
            assert info["loads_before_first_wait"] == 0, (name, info)


def test_attention_prefetches_the_cached_prefix_keys_and_values_before_the_wait(ptx):
    """Two waits (a split holding the action tokens' own keys waits before loading them); in the other,
    the whole K and V tile is in flight before the wait, not just the key mask."""
    info = ptx["attention"]
    assert info["waits"] == 2 and info["v4_in_block_before_wait"] >= info["kv_v4"] > 0, info
    assert info["loads_after_last_wait"] > 0


def test_the_persistent_step_kernel_compiles_for_hopper_with_its_grid_barriers(ptx):
    """Real size, bf16 and FP8 MLP: the arrivals release, the waits poll with acquire loads (an atomic add of
    0 with acquire semantics compiled to nothing in Triton 3.6) and a sleep, and check the error flag with
    volatile loads; the trace reads the global timer (the interpreter cannot check any of that)."""
    for name in ("step", "step-fp8"):
        info = ptx[name]
        assert info["release"] >= 5 and info["acquire"] >= 5 and info["volatile_polls"] >= 5, (name, info)
        assert info["sleeps"] >= 5 and info["timer"] >= 5, (name, info)
