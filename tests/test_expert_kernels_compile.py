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

ROOT = Path(__file__).resolve().parents[1]

COMPILE = r'''
import itertools, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from policy.backends import expert_triton as et

P, F, I = "*bf16", "*fp32", "*i32"
PTRS = {"w_scale_ptr": F, "gate_ptr": F, "scale_ptr": F, "shift_ptr": F, "ws_ptr": F, "cnt_ptr": I, "bias_ptr": F}
INTS = {"M": "i32", "N": "i32", "T": "i32", "KEYS": "i32", "prefix_len": "i32", "eps": "fp32", "RB": "i32", "S": "i32",
        "R": "i32", "own_start": "i32", "own_end": "i32", "sm_scale": "fp32"}

def build(fn, consts, w_type=P):
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n.endswith("_ptr"):
            sig[n] = w_type if n == "w_ptr" else PTRS.get(n, P)
            attrs[(i,)] = [["tt.divisibility", 16]]  # what a launch with torch's (256-byte aligned) tensors gets
        elif n in INTS and n not in consts:
            sig[n] = INTS[n]
        else:
            sig[n] = "constexpr"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32))
    lines = k.asm["ptx"].splitlines()
    wait = next((i for i, l in enumerate(lines) if "griddepcontrol.wait" in l), None)
    loads = [i for i, l in enumerate(lines) if "ld.global" in l]
    return {"wait": wait, "loads_before_wait": sum(i < wait for i in loads) if wait is not None else 0,
            "loads_after_wait": sum(i > wait for i in loads) if wait is not None else len(loads),
            "vector_loads": sum("ld.global.v4" in lines[i] for i in loads),
            "launch_dependents": any("griddepcontrol.launch_dependents" in l for l in lines)}

out = {}
for split, fp8 in itertools.product([True, False], [False, True]):
    blocks = dict(BLOCK_M=16 if split else 64, BLOCK_N=32, BLOCK_K=128, SPLIT_K=split, W_FP8=fp8, IEEE=False, PDL=True)
    w = "*fp8e4nv" if fp8 else P
    tag = f"{'split' if split else 'loop'}{'-fp8' if fp8 else ''}"
    out[f"gated_residual/{tag}"] = build(et._gated_residual_kernel, dict(K=4096, **blocks), w)
    out[f"geglu/{tag}"] = build(et._geglu_kernel, dict(K=1024, GELU_C=et.GELU_C, **blocks), w)
    out[f"qkv_rope/{tag}"] = build(et._qkv_rope_kernel, dict(K=1024, NQ=8, HD=256, **blocks), w)
out["attention"] = build(et._attention_kernel, dict(HD=256, IEEE=False, PDL=True, BLOCK_Q=16, BLOCK_S=64))
out["gated_residual/no-pdl"] = build(et._gated_residual_kernel, dict(K=4096, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=True,
                                                                     W_FP8=False, IEEE=False, PDL=False))
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_hopper_with_programmatic_dependent_launch(ptx):
    for name, info in ptx.items():
        if name.endswith("no-pdl"):
            assert info["wait"] is None and not info["launch_dependents"], name
        else:
            assert info["wait"] is not None and info["launch_dependents"], name


def test_split_k_kernels_load_their_weights_before_the_wait_and_their_inputs_after(ptx):
    for name, info in ptx.items():
        if "/split" in name:
            assert info["loads_before_wait"] > 0 and info["loads_after_wait"] > 0, (name, info)
            assert info["vector_loads"] > 0, (name, info)  # 16-byte loads: the weights stream at full width
        elif "/loop" in name:  # more rows: a K loop, everything after the wait
            assert info["loads_before_wait"] == 0, (name, info)
    # attention: the prefix's K/V (and the key mask) before the wait, q (and the own keys) after it
    assert ptx["attention"]["loads_before_wait"] > 0 and ptx["attention"]["loads_after_wait"] > 0
