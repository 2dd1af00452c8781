"""openpi's JAX checkpoints (orbax OCDBT + zarr), read without JAX, orbax or openpi.

A released checkpoint is `<ckpt>/params/` (the parameter tree) and `<ckpt>/assets/<asset_id>/`.
`params/_METADATA` (JSON) lists every array's tree path; the arrays are zarr (v2) arrays inside an
OCDBT key-value store, which tensorstore reads (older checkpoints keep one zarr directory per array
directly under params/, read through tensorstore's `file` driver). Paths are spelled as openpi's
`restore_params` does: the item wrapper `params` dropped, and a trailing `value` dropped when every
path has one (nnx.State checkpoints do; pure-dict ones do not).

The mapping to our modules is the general one of the reference (§7.5): stacked layers are sliced,
flax kernels (in, out) transposed, einsum weights reshaped by their head count and head size (so
it holds for any width, unlike openpi's converter, whose o_proj reshape assumes heads x head_dim =
width). Arrays are read one at a time, so peak host memory is about twice the largest array (its
compressed bytes and the decoded array), not the model.

How a stacked (per-layer) array is read follows how it is chunked, because a zarr chunk is the unit
tensorstore decodes: openpi's checkpoints (orbax: `chunks` = the shard shape, `zstd` compressor)
store each array as ONE chunk, so reading layer i alone would decompress the whole stack again for
every layer; we read such an array once and slice its layers. An array chunked per layer is read a
layer at a time (memory bounded by one layer). In general: one read per chunk along the layer axis.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from policy.pi05.config import Pi05Config
from policy.pi05.weights import build_model, check_tensors, load_state, parameter_dtype


@dataclass(frozen=True)
class ArrayPlan:
    path: str  # openpi's spelling, e.g. "PaliGemma/llm/layers/attn/q_einsum/w"
    shape: tuple[int, ...]
    # (our parameter name, layer index or None, transform): the transform gets array[layer] (one
    # layer of a stacked array, read on its own) or the whole array when the index is None.
    targets: tuple[tuple[str, int | None, Callable[[np.ndarray], np.ndarray]], ...]


def _same(a):
    return a


def _t(a):
    return a.T


def _layers(path, shape, name, fn, depth) -> ArrayPlan:
    """A stacked per-layer array: layer i of `name` ("...{i}...") is fn(array[i])."""
    return ArrayPlan(path, shape, tuple((name.format(i=i), i, fn) for i in range(depth)))


def _whole(path, shape, name, fn=None) -> ArrayPlan:
    return ArrayPlan(path, shape, ((name, None, fn or _same),))


def array_plan(cfg: Pi05Config) -> list[ArrayPlan]:
    """Every array of a pi05 JAX checkpoint: its path, shape, and the parameters it becomes."""
    W, vh, M, L = cfg.vision_width, cfg.vision_heads, cfg.vision_mlp_dim, cfg.vision_depth
    vhd, p, n, ps = W // vh, cfg.patch_size, cfg.num_patches, cfg.patch_size
    D, nh, nkv, hd, G, depth = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.depth
    E, EM = cfg.expert_width, cfg.expert_mlp_dim
    img, enc, llm = "PaliGemma/img", "PaliGemma/img/Transformer/encoderblock", "PaliGemma/llm"
    v = "vision.encoder.layers.{i}."
    plan = [
        _whole(f"{img}/embedding/kernel", (ps, ps, 3, W), "vision.embeddings.patch_embedding.weight",
               lambda a: a.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        _whole(f"{img}/embedding/bias", (W,), "vision.embeddings.patch_embedding.bias", _same),
        _whole(f"{img}/pos_embedding", (1, n, W), "vision.embeddings.position_embedding.weight",
               lambda a: a.reshape(n, W)),
        _layers(f"{enc}/LayerNorm_0/scale", (L, W), v + "layer_norm1.weight", _same, L),
        _layers(f"{enc}/LayerNorm_0/bias", (L, W), v + "layer_norm1.bias", _same, L),
        _layers(f"{enc}/LayerNorm_1/scale", (L, W), v + "layer_norm2.weight", _same, L),
        _layers(f"{enc}/LayerNorm_1/bias", (L, W), v + "layer_norm2.bias", _same, L),
        _layers(f"{enc}/MlpBlock_0/Dense_0/kernel", (L, W, M), v + "mlp.fc1.weight", _t, L),
        _layers(f"{enc}/MlpBlock_0/Dense_0/bias", (L, M), v + "mlp.fc1.bias", _same, L),
        _layers(f"{enc}/MlpBlock_0/Dense_1/kernel", (L, M, W), v + "mlp.fc2.weight", _t, L),
        _layers(f"{enc}/MlpBlock_0/Dense_1/bias", (L, W), v + "mlp.fc2.bias", _same, L),
    ]
    for jname, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        a = f"{enc}/MultiHeadDotProductAttention_0/{jname}"
        plan.append(_layers(f"{a}/kernel", (L, W, vh, vhd), v + f"self_attn.{ours}.weight",
                            lambda x: x.reshape(W, vh * vhd).T, L))
        plan.append(_layers(f"{a}/bias", (L, vh, vhd), v + f"self_attn.{ours}.bias", lambda x: x.reshape(-1), L))
    a = f"{enc}/MultiHeadDotProductAttention_0/out"
    plan += [
        _layers(f"{a}/kernel", (L, vh, vhd, W), v + "self_attn.out_proj.weight", lambda x: x.reshape(vh * vhd, W).T, L),
        _layers(f"{a}/bias", (L, W), v + "self_attn.out_proj.bias", _same, L),
        _whole(f"{img}/Transformer/encoder_norm/scale", (W,), "vision.post_layernorm.weight", _same),
        _whole(f"{img}/Transformer/encoder_norm/bias", (W,), "vision.post_layernorm.bias", _same),
        _whole(f"{img}/head/kernel", (W, D), "projector.linear.weight", _t),
        _whole(f"{img}/head/bias", (D,), "projector.linear.bias", _same),
        _whole(f"{llm}/embedder/input_embedding", (cfg.vocab_size, D), "llm.embed_tokens.weight", _same),
        _whole(f"{llm}/final_norm/scale", (D,), "llm.norm.weight", _same),
    ]
    # Gemma 2B (suffix "") and the action expert (suffix "_1") share the einsum layouts.
    for sfx, width, mlp, prefix in (("", D, G, "llm.layers.{i}."), ("_1", E, EM, "expert.layers.{i}.")):
        lay = f"{llm}/layers"
        plan += [
            # q: weight[n * hd + h, d] = w[n, d, h]
            _layers(f"{lay}/attn/q_einsum{sfx}/w", (depth, nh, width, hd), prefix + "self_attn.q_proj.weight",
                    lambda x: x.transpose(0, 2, 1).reshape(nh * hd, -1), depth),
            _layers(f"{lay}/attn/kv_einsum{sfx}/w", (depth, 2, nkv, width, hd), prefix + "self_attn.k_proj.weight",
                    lambda x: x[0].transpose(0, 2, 1).reshape(nkv * hd, -1), depth),
            # o: weight[d, n * hd + h] = w[n, h, d]
            _layers(f"{lay}/attn/attn_vec_einsum{sfx}/w", (depth, nh, hd, width), prefix + "self_attn.o_proj.weight",
                    lambda x: x.reshape(nh * hd, -1).T, depth),
            _layers(f"{lay}/mlp{sfx}/gating_einsum", (depth, 2, width, mlp), prefix + "mlp.gate_proj.weight",
                    lambda x: x[0].T, depth),
            _layers(f"{lay}/mlp{sfx}/linear", (depth, mlp, width), prefix + "mlp.down_proj.weight", _t, depth),
        ]
        # k/v and gate/up come from the same arrays: add the second target of each.
        kv, gating = plan[-4], plan[-2]
        by_layer = lambda targets: tuple(sorted(targets, key=lambda t: t[1]))  # noqa: E731  (read each layer once)
        plan[-4] = ArrayPlan(kv.path, kv.shape, by_layer(kv.targets + tuple(
            (prefix.format(i=i) + "self_attn.v_proj.weight", i, lambda x: x[1].transpose(0, 2, 1).reshape(nkv * hd, -1))
            for i in range(depth))))
        plan[-2] = ArrayPlan(gating.path, gating.shape, by_layer(gating.targets + tuple(
            (prefix.format(i=i) + "mlp.up_proj.weight", i, lambda x: x[1].T) for i in range(depth))))
    lay = f"{llm}/layers"
    plan += [
        _layers(f"{lay}/pre_attention_norm/scale", (depth, D), "llm.layers.{i}.input_layernorm.weight", _same, depth),
        _layers(f"{lay}/pre_ffw_norm/scale", (depth, D), "llm.layers.{i}.post_attention_layernorm.weight", _same, depth),
    ]
    for jname, ours in (("pre_attention_norm_1", "input_layernorm"), ("pre_ffw_norm_1", "post_attention_layernorm")):
        plan += [
            _layers(f"{lay}/{jname}/Dense_0/kernel", (depth, E, 3 * E), "expert.layers.{i}." + ours + ".dense.weight", _t, depth),
            _layers(f"{lay}/{jname}/Dense_0/bias", (depth, 3 * E), "expert.layers.{i}." + ours + ".dense.bias", _same, depth),
        ]
    plan += [
        _whole(f"{llm}/final_norm_1/Dense_0/kernel", (E, 3 * E), "expert.norm.dense.weight", _t),
        _whole(f"{llm}/final_norm_1/Dense_0/bias", (3 * E,), "expert.norm.dense.bias", _same),
    ]
    for head, (i, o) in (("action_in_proj", (cfg.action_dim, E)), ("action_out_proj", (E, cfg.action_dim)),
                         ("time_mlp_in", (E, E)), ("time_mlp_out", (E, E))):
        plan += [_whole(f"{head}/kernel", (i, o), f"{head}.weight", _t), _whole(f"{head}/bias", (o,), f"{head}.bias")]
    return plan


# ----- reading ---------------------------------------------------------------------------------------

class JaxCheckpoint:
    """The arrays of `<ckpt>/params`, by openpi path, read lazily with tensorstore."""

    def __init__(self, ckpt: str | os.PathLike):
        self.dir = Path(ckpt).expanduser()
        self.params = self.dir / "params"
        meta_path = self.params / "_METADATA"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.dir} is not an openpi JAX checkpoint: {meta_path} is missing")
        try:
            meta = json.loads(meta_path.read_text())
            self.zarr_driver = "zarr3" if meta.get("use_zarr3") else "zarr"
            keys = [tuple(str(k["key"]) for k in entry["key_metadata"]) if "key_metadata" in entry else ast.literal_eval(name)
                    for name, entry in meta["tree_metadata"].items()]
        except (ValueError, KeyError, TypeError, AttributeError, SyntaxError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path} is corrupt ({type(exc).__name__}: {str(exc)[:200]}): re-copy the checkpoint") from None
        strip_value = bool(keys) and all(k[-1] == "value" for k in keys)
        self.names: dict[str, str] = {}  # openpi path -> stored array name
        for k in keys:
            path = k[1:] if k and k[0] == "params" else k
            if strip_value:
                path = path[:-1]
            self.names["/".join(path)] = ".".join(k)
        ocdbt = (self.params / "manifest.ocdbt").is_file()
        base = f"file://{self.params.resolve()}/"
        self._kvstore = {"driver": "ocdbt", "base": base} if ocdbt else {"driver": "file", "path": str(self.params.resolve()) + "/"}

    def _open(self, path: str):
        import tensorstore as ts

        try:
            return ts.open({"driver": self.zarr_driver, "kvstore": self._kvstore, "path": self.names[path]},
                           read=True).result()
        except ValueError as exc:  # tensorstore's NOT_FOUND / corrupt data: name the array, say what to do
            raise ValueError(f"{self.params}: array {path} cannot be opened ({str(exc)[:300]}): the checkpoint is "
                             f"incomplete or corrupt; re-copy it") from None

    def _result(self, path: str, future) -> np.ndarray:
        try:
            return np.asarray(future.result())
        except ValueError as exc:
            raise ValueError(f"{self.params}: array {path} cannot be read ({str(exc)[:300]}): the checkpoint is "
                             f"incomplete or corrupt; re-copy it") from None

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._open(path).shape)  # the array's own shape (write_shape is per shard)

    def read(self, path: str, index: int | None = None) -> np.ndarray:
        """The array, or only its `index`-th slice along the first (layer) axis. To read every
        layer, use `layers`: on a one-chunk array each call here decodes the whole chunk."""
        store = self._open(path)
        return self._result(path, (store if index is None else store[index]).read())

    def layers(self, path: str) -> Iterator[tuple[int, np.ndarray]]:
        """(i, array[i]) for every index of the first (layer) axis, decoding each stored chunk once:
        one read per chunk along that axis (the whole array for openpi's one-chunk arrays, a layer
        at a time for arrays chunked per layer), so memory holds one chunk's layers at a time."""
        store = self._open(path)
        n = store.shape[0]
        step = store.chunk_layout.read_chunk.shape[0] or n  # layers per chunk
        for start in range(0, n, step):
            block = self._result(path, store[start:min(start + step, n)].read())  # (layers, ...)
            for k in range(block.shape[0]):
                yield start + k, block[k]
            del block


def to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: reinterpret the bits
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def check_arrays(ckpt: JaxCheckpoint, plan: list[ArrayPlan]) -> None:
    """Every array the plan expects, with its shape, and nothing else (one error listing all problems)."""
    expected = {p.path: p.shape for p in plan}
    stores = {path: ckpt._open(path) for path in ckpt.names}
    check_tensors(expected, {path: tuple(st.shape) for path, st in stores.items()}, str(ckpt.params),
                  {path: st.dtype.numpy_dtype.name for path, st in stores.items()})


def iter_parameters(ckpt: JaxCheckpoint, plan: list[ArrayPlan]) -> Iterator[tuple[str, torch.Tensor]]:
    """(our parameter name, tensor) for every parameter, in plan order, reading one array at a time;
    a stacked array is read chunk by chunk along its layer axis (see `JaxCheckpoint.layers`)."""
    for entry in plan:
        if entry.targets[0][1] is None:
            whole = ckpt.read(entry.path)
            for name, _, fn in entry.targets:
                yield name, to_torch(fn(whole))
            del whole
            continue
        by_layer: dict[int, list] = {}
        for name, index, fn in entry.targets:  # plan order is layer order (array_plan sorts them)
            by_layer.setdefault(index, []).append((name, fn))
        assert list(by_layer) == sorted(by_layer), entry.path
        for index, layer in ckpt.layers(entry.path):
            for name, fn in by_layer.pop(index, ()):
                yield name, to_torch(fn(layer))
        assert not by_layer, f"{entry.path}: layers {sorted(by_layer)} not in the checkpoint"


def load_jax_checkpoint(path: str | os.PathLike, cfg: Pi05Config, device="cpu",
                        dtype: torch.dtype = torch.bfloat16):
    """Pi05Model from an openpi JAX checkpoint directory (see the module docstring)."""
    ckpt = JaxCheckpoint(path)
    plan = array_plan(cfg)
    check_arrays(ckpt, plan)
    model = build_model(cfg)
    state = {}
    for name, tensor in iter_parameters(ckpt, plan):
        state[name] = tensor.to(device=device, dtype=parameter_dtype(name, dtype))
    return load_state(model, state, device, dtype, str(ckpt.params))


# ----- writing (tests and benchmarks: openpi's on-disk layout, made without JAX) ----------------------

@dataclass(frozen=True)
class RowSource:
    """An array handed to `write_jax_checkpoint` a block of rows (first-axis indices) at a time, so
    that writing a multi-GB array does not hold it twice (the source and tensorstore's chunk)."""
    shape: tuple[int, ...]
    dtype: np.dtype
    rows: Callable[[int, int], np.ndarray]  # (start, stop) -> array[start:stop]


# orbax's OCDBT settings (as in the checkpoints openpi's training code writes: tests/golden/pi05).
OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000, "compression": {"id": "zstd"}}
WRITE_BLOCK_BYTES = 64 * 2**20


def write_jax_checkpoint(ckpt: str | os.PathLike, arrays: Iterator[tuple[str, np.ndarray | RowSource]],
                         with_value: bool = True, compress: bool = True, layer_chunks: bool = False) -> Path:
    """Write `(openpi path, array)` pairs as `<ckpt>/params` (OCDBT + zarr v2, one array at a time) with
    the `_METADATA` tree openpi's checkpoints carry; `with_value` appends the nnx.State `value` key.

    By default each array is one zarr chunk compressed with zstd (level 1), as orbax writes an
    unsharded array (orbax `build_zarr_shard_and_chunk_metadata`: `chunks` = shard shape,
    `compressor` = `{"id": "zstd"}`, whose tensorstore default level is 1). `compress=False` stores raw
    bytes; `layer_chunks=True` gives every array of 2+ dimensions one chunk per index of its first
    (layer) axis, a layout openpi does not write, kept to test the reader's layer-at-a-time path.
    A `RowSource` is written in blocks of rows inside one transaction (memory: the chunk, its
    compressed bytes and one block)."""
    import tensorstore as ts

    params = Path(ckpt).expanduser() / "params"
    params.mkdir(parents=True, exist_ok=True)
    kvstore = {"driver": "ocdbt", "base": f"file://{params.resolve()}/", "config": OCDBT_CONFIG}
    tree = {}
    for path, array in arrays:
        keys = ("params", *path.split("/")) + (("value",) if with_value else ())
        shape = tuple(array.shape)
        chunks = list(shape)
        if layer_chunks and len(shape) > 1:
            chunks[0] = 1
        dtype = np.dtype(array.dtype)
        store = ts.open({"driver": "zarr", "kvstore": kvstore, "path": ".".join(keys),
                         "metadata": {"shape": list(shape), "chunks": chunks,
                                      "compressor": {"id": "zstd", "level": 1} if compress else None}},
                        create=True, delete_existing=True,
                        dtype="bfloat16" if dtype.name == "bfloat16" else dtype.name).result()
        if isinstance(array, RowSource):
            step = max(1, WRITE_BLOCK_BYTES // max(1, dtype.itemsize * int(np.prod(shape[1:]))))
            with ts.Transaction() as txn:
                for start in range(0, shape[0], step):
                    stop = min(start + step, shape[0])
                    store.with_transaction(txn)[start:stop].write(array.rows(start, stop)).result()
        else:
            store.write(array).result()
        del store
        tree[str(keys)] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)},
        }
    (params / "_METADATA").write_text(json.dumps({"tree_metadata": tree, "use_zarr3": False}))
    return params


def random_arrays(cfg: Pi05Config, seed: int = 0, scale: float = 0.02) -> Iterator[tuple[str, RowSource]]:
    """Random float32 arrays (N(0, scale^2)) with every path and shape of a pi05 JAX checkpoint, one at a
    time, as `RowSource`s: block (start, stop) of array k is drawn from the generator seeded
    (seed, k, start), so a real-size checkpoint is written without holding a whole array twice."""
    def source(k: int, shape: tuple[int, ...]) -> RowSource:
        def rows(start: int, stop: int) -> np.ndarray:
            rng = np.random.default_rng([seed, k, start])
            return rng.standard_normal((stop - start, *shape[1:]), dtype=np.float32) * np.float32(scale)
        return RowSource(shape, np.dtype(np.float32), rows)

    for k, entry in enumerate(array_plan(cfg)):
        yield entry.path, source(k, entry.shape)
