"""Time and peak memory of `python -m policy.convert` on a real-size (pi05_libero) JAX checkpoint.

    python scripts/bench_convert.py [DIR] [--keep] [--json PATH] [--config pi05_libero]

Writes a random pi05_libero JAX checkpoint to DIR/jax (default /tmp/pi05_random; reused if there),
converts it with `python -m policy.convert DIR/jax DIR/pytorch` in a child process, prints the
conversion's wall time and peak RSS (the child's own `ru_maxrss`, from wait4), checks a few
converted tensors against the source, writes a small JSON (default DIR/../bench_convert.json) and,
unless --keep, deletes both checkpoints (about 25 GB together).

The checkpoint is random (the real one cannot be downloaded here) but laid out as openpi's is:
every array path and shape of pi05_libero, float32, OCDBT + zarr v2, `_METADATA` with nnx `value`
keys, and each array ONE zarr chunk compressed with zstd level 1 (orbax's default for an unsharded
array; `write_jax_checkpoint`). Random float32 normals compress about as badly as trained float32
weights do (the mantissa bits are noise in both), so the bytes read and decompressed are realistic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**20, 1), "os": platform.platform(),
            "python": platform.python_version(), "load_average_1_5_15": os.getloadavg()}


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default="/tmp/pi05_random")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (they are ~25 GB)")
    p.add_argument("--config", default="pi05_libero", help="model sizes (tiny: a quick check of this script)")
    p.add_argument("--json", default=None, help="where to write the results (default DIR/../bench_convert.json)")
    args = p.parse_args(argv)
    root = Path(args.dir)
    jax_dir, out_dir = root / "jax", root / "pytorch"
    sys.path.insert(0, str(REPO))
    from policy.pi05.config import get_config
    from policy.pi05.jax_checkpoint import JaxCheckpoint, array_plan, random_arrays, write_jax_checkpoint

    result = {"command": "python scripts/bench_convert.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine()}
    if not (jax_dir / "params" / "_METADATA").is_file():
        t0 = time.perf_counter()
        write_jax_checkpoint(jax_dir, random_arrays(get_config(args.config)))
        result["write_s"] = round(time.perf_counter() - t0, 1)
        result["write_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print(f"wrote a random {args.config} JAX checkpoint in {result['write_s']:.0f} s "
              f"(peak RSS {result['write_peak_rss_gib']:.2f} GiB)", flush=True)
    plan = array_plan(get_config(args.config))
    ckpt = JaxCheckpoint(jax_dir)
    largest = max(plan, key=lambda e: int(np.prod(e.shape)))
    meta = ckpt._open(largest.path).spec().to_json()["metadata"]
    result["source"] = {
        "arrays": len(plan), "float32_gib": round(sum(4 * int(np.prod(e.shape)) for e in plan) / 2**30, 2),
        "on_disk_gib": round(dir_bytes(jax_dir / "params") / 2**30, 2),
        "largest_array": {"path": largest.path, "shape": list(largest.shape), "chunks": meta["chunks"],
                          "compressor": meta["compressor"], "gib": round(4 * int(np.prod(largest.shape)) / 2**30, 2)},
    }

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "policy.convert", str(jax_dir), str(out_dir), "--config", args.config], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"policy.convert failed ({proc.returncode}):\n{output[-4000:]}")
    result["convert"] = {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
                         "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
                         "output_gib": round((out_dir / "model.safetensors").stat().st_size / 2**30, 2),
                         "last_line": output.strip().splitlines()[-1]}
    print(result["convert"]["last_line"])
    print(f"convert: {wall:.1f} s wall ({usage.ru_utime:.0f} s user, {usage.ru_stime:.0f} s sys), peak RSS "
          f"{usage.ru_maxrss / 2**20:.2f} GiB; source {result['source']['float32_gib']} GiB of float32 in "
          f"{result['source']['on_disk_gib']} GiB on disk, largest array {result['source']['largest_array']['gib']} GiB "
          f"in one chunk", flush=True)

    # spot check: a few converted tensors equal the source arrays (whole arrays and layers of stacked ones)
    from safetensors import safe_open

    from policy.pi05.weights import openpi_key

    q = next(e for e in plan if e.path == "PaliGemma/llm/layers/attn/q_einsum/w")  # stacked, 302 MiB
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        for entry in plan[:2] + plan[-6:] + [q]:
            whole = ckpt.read(entry.path)
            for name, index, fn in entry.targets[:1] + entry.targets[-1:]:
                expected = fn(whole if index is None else whole[index])
                assert np.array_equal(f.get_tensor(openpi_key(name)).numpy(), expected), name
    print("spot check: converted tensors equal the source arrays")

    # What reading a one-chunk stacked array layer by layer (the reader before this change) costs.
    depth = q.shape[0]
    t0 = time.perf_counter()
    layers = [layer for _, layer in ckpt.layers(q.path)]
    once = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert all(np.array_equal(ckpt.read(q.path, i), layers[i]) for i in range(depth))
    per_layer = time.perf_counter() - t0
    result["stacked_array_read"] = {"path": q.path, "shape": list(q.shape), "one_read_s": round(once, 2),
                                    f"{depth}_layer_reads_s": round(per_layer, 2)}
    print(f"{q.path} {list(q.shape)}: one read {once:.2f} s, {depth} reads of a layer each {per_layer:.2f} s")
    del layers

    result["machine"]["load_average_at_end"] = os.getloadavg()  # other jobs on the machine
    dest = Path(args.json) if args.json else root.parent / "bench_convert.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {dest}")
    if not args.keep:
        shutil.rmtree(root)
        print(f"deleted {root}")
    return result


if __name__ == "__main__":
    main()
