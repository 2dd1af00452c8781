"""Convert an openpi JAX checkpoint into a PyTorch one, streaming array by array.

    python -m policy.convert ~/.cache/openpi/openpi-assets/checkpoints/pi05_libero ~/.cache/openpi/openpi-assets/checkpoints/pi05_libero_pytorch

Writes DST/model.safetensors in openpi's key layout (the tied token embedding under
`paligemma_with_expert.paligemma.lm_head.weight`, as openpi's converter writes it), DST/config.json
and a copy of SRC/assets. The safetensors header is written first (every shape is known from the
model), then each tensor's bytes as its source array is read, so host memory holds one source
array at a time, never the model. `--dtype source` (default) keeps each array's stored dtype, so
loading the result gives bit-identical parameters to loading SRC; `--dtype bfloat16` halves the file
as openpi's converter does. Without JAX, orbax or openpi.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

from policy.pi05.config import get_config
from policy.pi05.jax_checkpoint import JaxCheckpoint, array_plan, check_arrays, iter_parameters
from policy.pi05.weights import IGNORED_KEYS, UNTIED_EMBEDDING, TIED_EMBEDDING, openpi_key

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _source_dtype(ckpt: JaxCheckpoint, path: str) -> torch.dtype:
    name = ckpt._open(path).dtype.numpy_dtype.name
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def convert(src: str | Path, dst: str | Path, config: str = "pi05_libero", dtype: str = "source",
            unused_lm_head: bool = True, log=print) -> Path:
    """Write DST (see the module docstring); returns the path of model.safetensors."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dtype not in ("source", *_OUT_DTYPES):
        raise ValueError(f"dtype must be source, float32 or bfloat16, got {dtype!r}")
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST is SRC ({src}): write the PyTorch copy to another directory")
    cfg = get_config(config)
    ckpt = JaxCheckpoint(src)
    plan = array_plan(cfg)
    check_arrays(ckpt, plan)
    dst.mkdir(parents=True, exist_ok=True)

    # Every output tensor in the order it is written: [openpi key, shape, dtype, plan index or None].
    from policy.pi05.weights import build_model

    shapes = {n: tuple(p.shape) for n, p in build_model(cfg).state_dict().items()}
    entries = []
    for idx, entry in enumerate(plan):
        out_dtype = _source_dtype(ckpt, entry.path) if dtype == "source" else _OUT_DTYPES[dtype]
        entries += [[openpi_key(name), shapes[name], out_dtype, idx] for name, _, _ in entry.targets]
    if unused_lm_head:  # openpi's strict loader wants it; it is unused (ours ignores it): zeros
        (ignored,) = IGNORED_KEYS
        entries.append([ignored, (cfg.vocab_size, cfg.expert_width), entries[0][2], None])

    header, offset = {}, 0
    for key, shape, dt, _ in entries:
        size = int(np.prod(shape)) * torch.finfo(dt).bits // 8
        header[key] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", UNTIED_EMBEDDING: TIED_EMBEDDING}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # safetensors aligns the data section to 8 bytes

    out = dst / "model.safetensors"
    tmp = out.with_suffix(".safetensors.partial")
    t0 = time.perf_counter()
    try:
        _write(tmp, blob, entries, ckpt, plan, unused_lm_head, log)
    except BaseException:  # a failed or interrupted read leaves no multi-GiB .partial behind
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    (dst / "config.json").write_text(json.dumps({
        "action_dim": cfg.action_dim, "action_horizon": cfg.chunk_size, "max_token_len": cfg.max_token_len,
        "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m", "precision": dtype,
        "converted_from": str(src),
    }, indent=2) + "\n")
    if (src / "assets").is_dir():
        shutil.copytree(src / "assets", dst / "assets", dirs_exist_ok=True)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {seconds:.1f} s; peak RSS {peak_gib:.2f} GiB")
    return out


def _write(tmp: Path, blob: bytes, entries: list, ckpt: JaxCheckpoint, plan, unused_lm_head: bool, log) -> None:
    """The safetensors file: header, then every tensor in `entries` order, read one array at a time."""
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        written = iter(entries)
        done = -1
        for name, tensor in iter_parameters(ckpt, plan):  # one array (or one layer of one) at a time
            key, shape, dt, idx = next(written)
            assert key == openpi_key(name) and tuple(tensor.shape) == shape, (key, name, tensor.shape, shape)
            f.write(tensor.to(dt).contiguous().view(torch.uint8).numpy())
            if idx != done:
                done = idx
                log(f"  [{idx + 1}/{len(plan)}] {plan[idx].path}")
        if unused_lm_head:
            key, (rows, cols), dt, _ = next(written)
            block = torch.zeros(min(rows, 4096), cols, dtype=dt).view(torch.uint8).numpy()
            for start in range(0, rows, len(block)):
                f.write(block[: min(len(block), rows - start)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="openpi JAX checkpoint directory (holding params/ and assets/)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--config", default="pi05_libero", help="pi05_libero | pi05_base | tiny")
    p.add_argument("--dtype", default="source", choices=["source", "float32", "bfloat16"])
    p.add_argument("--no-unused-lm-head", action="store_true",
                   help="omit gemma_expert.lm_head.weight (unused; openpi's own strict loader wants it)")
    args = p.parse_args(argv)
    try:
        convert(args.src, args.dst, args.config, args.dtype, not args.no_unused_lm_head)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
