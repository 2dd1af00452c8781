"""Time and peak memory of `python -m policy.convert` on a real-size (pi05_libero) JAX checkpoint.

    python scripts/bench_convert.py /tmp/pi05_random        # writes <dir>/jax (random, ~13 GB) if missing,
                                                            # converts it to <dir>/pytorch, checks a few tensors

The checkpoint is random (the real one cannot be downloaded here) but has openpi's exact layout:
every array path and shape of pi05_libero, float32, OCDBT + zarr, `_METADATA` with nnx `value` keys.
"""

import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def main(root: str) -> None:
    root = Path(root)
    jax_dir, out_dir = root / "jax", root / "pytorch"
    if not (jax_dir / "params" / "_METADATA").is_file():
        from policy.pi05.config import get_config
        from policy.pi05.jax_checkpoint import random_arrays, write_jax_checkpoint

        t0 = time.perf_counter()
        write_jax_checkpoint(jax_dir, random_arrays(get_config("pi05_libero")))
        print(f"wrote a random pi05_libero JAX checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "policy.convert", str(jax_dir), str(out_dir)],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    child_peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(proc.stdout.strip().splitlines()[-1])
    print(f"convert: {wall:.1f} s wall, peak RSS {child_peak_gib:.2f} GiB (the float32 weights are "
          f"{sum(p.stat().st_size for p in (jax_dir / 'params').rglob('*') if p.is_file()) / 2**30:.1f} GiB on disk)")
    # spot-check: a few converted tensors equal the source arrays
    from safetensors import safe_open

    from policy.pi05.config import get_config
    from policy.pi05.jax_checkpoint import JaxCheckpoint, array_plan
    from policy.pi05.weights import openpi_key

    ckpt = JaxCheckpoint(jax_dir)
    with safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        plan = array_plan(get_config("pi05_libero"))
        for entry in plan[:2] + plan[-6:]:
            for name, index, fn in entry.targets[:3]:
                assert np.array_equal(f.get_tensor(openpi_key(name)).numpy(), fn(ckpt.read(entry.path, index))), name
    print("spot check: converted tensors equal the source arrays")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pi05_random")
