"""openpi JAX (orbax OCDBT + zarr) checkpoints, read without JAX; conversion to PyTorch."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from policy.convert import convert
from policy.pi05.config import get_config
from policy.pi05.jax_checkpoint import JaxCheckpoint, array_plan, iter_parameters, random_arrays, write_jax_checkpoint
from policy.pi05.checkpoints import load_model
from policy.pi05.weights import CheckpointMismatch

JAX_DIRS = ["tiny_openpi_jax", "tiny_openpi_jax_pure"]


@pytest.fixture(scope="module")
def reference(golden_dir):
    return load_model(golden_dir / "tiny_openpi_model.safetensors", config="tiny", dtype=torch.float32)


def same_parameters(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", JAX_DIRS)
def test_jax_checkpoint_parameters_equal_the_pytorch_file_bit_for_bit(golden_dir, reference, name):
    model = load_model(golden_dir / name, config="tiny", dtype=torch.float32)
    assert same_parameters(model, reference)  # incl. the prefix o_proj that openpi's converter gets wrong here


@pytest.mark.parametrize("name", JAX_DIRS)
def test_jax_checkpoint_reproduces_openpis_outputs(golden_dir, golden_case, golden_inputs, name):
    model = load_model(golden_dir / name, config="tiny", dtype=torch.float32)
    *args, noise = golden_inputs
    for n, key in ((1, "actions_1step"), (10, "actions_10steps")):
        actions = model.sample_actions(*args, noise=noise, num_steps=n)
        assert (actions - golden_case[f"output.{key}"]).abs().max() <= 1e-4


def test_paths_with_and_without_value_read_alike(golden_dir):
    with_value, without = JaxCheckpoint(golden_dir / JAX_DIRS[0]), JaxCheckpoint(golden_dir / JAX_DIRS[1])
    assert set(with_value.names) == set(without.names) and len(with_value.names) == 51
    assert "PaliGemma/llm/layers/attn/q_einsum/w" in with_value.names
    assert with_value.names["PaliGemma/llm/layers/attn/q_einsum/w"].endswith(".value")


def _copy(golden_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(golden_dir / JAX_DIRS[0], dst)
    return dst


def test_missing_array_is_named(golden_dir, tmp_path):
    ckpt = _copy(golden_dir, tmp_path)
    meta_path = ckpt / "params" / "_METADATA"
    meta = json.loads(meta_path.read_text())
    meta["tree_metadata"] = {k: v for k, v in meta["tree_metadata"].items() if "'time_mlp_out', 'bias'" not in k}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match=r"missing: time_mlp_out/bias \[32\]"):
        load_model(ckpt, config="tiny")


def test_reshaped_array_is_named(golden_dir, tmp_path):
    import tensorstore as ts

    ckpt = _copy(golden_dir, tmp_path)
    src = JaxCheckpoint(ckpt)
    path = "PaliGemma/llm/layers/mlp_1/linear"
    store = ts.open({"driver": "zarr", "kvstore": src._kvstore, "path": src.names[path],
                     "metadata": {"shape": [2, 64, 16], "chunks": [2, 64, 16], "compressor": None}},
                    create=True, delete_existing=True, dtype="float32").result()
    store.write(np.zeros((2, 64, 16), np.float32)).result()
    with pytest.raises(CheckpointMismatch) as info:
        load_model(ckpt, config="tiny")
    assert f"wrong shape: {path}: checkpoint [2, 64, 16], model [2, 64, 32]" in str(info.value)


def test_bfloat16_arrays_are_accepted(golden_dir, reference, tmp_path):
    src = JaxCheckpoint(golden_dir / JAX_DIRS[1])
    write_jax_checkpoint(tmp_path / "bf16", ((p, src.read(p).astype(ml_dtypes.bfloat16)) for p in src.names))
    assert JaxCheckpoint(tmp_path / "bf16")._open("time_mlp_in/kernel").dtype.numpy_dtype.name == "bfloat16"
    model = load_model(tmp_path / "bf16", config="tiny", dtype=torch.float32)
    assert same_parameters(model, reference)  # the golden values are bf16-exact


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="params/_METADATA"):
        load_model(tmp_path, config="tiny")


@pytest.mark.parametrize("dtype", ["source", "bfloat16"])
def test_convert_writes_openpis_layout_and_loads_bit_identical(golden_dir, reference, tmp_path, dtype):
    out = convert(golden_dir / JAX_DIRS[0], tmp_path / "pt", config="tiny", dtype=dtype, log=lambda *a: None)
    with safe_open(str(out), "pt") as f, safe_open(str(golden_dir / "tiny_openpi_model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())  # openpi's 92 keys, incl. the tied name and the unused lm_head
        for k in f.keys():
            assert f.get_slice(k).get_shape() == g.get_slice(k).get_shape(), k
        assert f.get_tensor("time_mlp_in.weight").dtype == (torch.float32 if dtype == "source" else torch.bfloat16)
    converted = load_model(tmp_path / "pt", config="tiny", dtype=torch.float32)
    assert same_parameters(converted, reference)
    from_jax = load_model(golden_dir / JAX_DIRS[0], config="tiny", dtype=torch.bfloat16)
    assert same_parameters(load_model(tmp_path / "pt", config="tiny", dtype=torch.bfloat16), from_jax)
    assert json.loads((tmp_path / "pt" / "config.json").read_text())["action_horizon"] == 10
    assert (tmp_path / "pt" / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").is_file()


def test_convert_command_reports_errors(tmp_path, capsys):
    from policy.convert import main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "not an openpi JAX checkpoint" in str(info.value)


BIGGEST_DATA = "params/ocdbt.process_0/d/db0a8b493dbee994973613fed5d74f1f"  # where tiny_openpi_jax keeps most arrays


@pytest.mark.parametrize("damage", ["data file missing", "data file cut", "metadata cut", "metadata empty"])
def test_an_incomplete_or_corrupt_jax_checkpoint_says_recopy(golden_dir, tmp_path, damage):
    """A half-finished gsutil copy used to end in a tensorstore or JSON traceback naming neither the array
    nor what to do."""
    ckpt = _copy(golden_dir, tmp_path)
    data, meta = ckpt / BIGGEST_DATA, ckpt / "params" / "_METADATA"
    assert data.stat().st_size > 100_000
    if damage == "data file missing":
        data.unlink()
    elif damage == "data file cut":
        data.write_bytes(data.read_bytes()[:1000])
    elif damage == "metadata cut":
        meta.write_text(meta.read_text()[:500])
    else:
        meta.write_text("{}")
    with pytest.raises(ValueError, match="re-copy") as info:
        load_model(ckpt, config="tiny")
    assert str(ckpt / "params") in str(info.value)


def test_integer_or_non_finite_arrays_are_refused_by_name(golden_dir, tmp_path):
    """Integer weights used to be cast to floats and give finite nonsense; NaN weights NaN actions."""
    src = JaxCheckpoint(golden_dir / JAX_DIRS[1])
    target = "PaliGemma/llm/layers/mlp/linear"
    write_jax_checkpoint(tmp_path / "ints", ((p, src.read(p).astype(np.int32) if p == target else src.read(p))
                                             for p in src.names))
    with pytest.raises(CheckpointMismatch, match=f"wrong dtype: {target}: checkpoint int32"):
        load_model(tmp_path / "ints", config="tiny")

    def poisoned(p):
        a = src.read(p)
        if p == target:
            a = a.copy()
            a.flat[7] = np.nan
        return a

    write_jax_checkpoint(tmp_path / "nan", ((p, poisoned(p)) for p in src.names))
    with pytest.raises(CheckpointMismatch, match="NaN or infinite values in 1 tensors: .*mlp"):
        load_model(tmp_path / "nan", config="tiny")


def test_a_failed_conversion_leaves_no_partial_file_and_dst_must_not_be_src(golden_dir, tmp_path):
    ckpt = _copy(golden_dir, tmp_path)
    (ckpt / BIGGEST_DATA).write_bytes((ckpt / BIGGEST_DATA).read_bytes()[:1000])  # fails mid-way through the arrays
    with pytest.raises(ValueError, match="re-copy"):
        convert(ckpt, tmp_path / "out", config="tiny", log=lambda *a: None)
    assert list((tmp_path / "out").iterdir()) == []  # no multi-GiB .partial left behind
    with pytest.raises(ValueError, match="DST is SRC"):
        convert(golden_dir / JAX_DIRS[0], golden_dir / JAX_DIRS[0], config="tiny", log=lambda *a: None)


def test_policy_runs_from_a_jax_checkpoint(golden_dir, spm_tokenizer):
    from policy.libero_policy import Pi05Policy

    policy = Pi05Policy(golden_dir / JAX_DIRS[0], spm_tokenizer, num_steps=2, device="cpu", dtype="float32",
                        config="tiny")
    rng = np.random.default_rng(0)
    out = policy.infer({"image": rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8),
                        "wrist_image": rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8),
                        "state": np.zeros((1, 8), np.float32), "prompt": ["put the bowl on the plate"]})
    assert out["actions"].shape == (1, 10, 7) and np.isfinite(out["actions"]).all()
    assert policy.norm_stats.source.endswith("physical-intelligence/libero/norm_stats.json")


# ----- reading a stacked array: one decode per stored chunk ---------------------------------------

def _chunk_decodes() -> int:
    """tensorstore's own count of chunk reads (each one decodes, i.e. decompresses, a whole chunk)."""
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/cache/chunk_cache/reads")
    return sum(v["value"] for m in metrics for v in m["values"])


def test_writer_lays_arrays_out_as_openpis_checkpoint_does(golden_dir, tmp_path):
    """Our writer's default layout equals the one openpi's training code wrote (tests/golden)."""
    ours_dir = write_jax_checkpoint(tmp_path / "ours", random_arrays(get_config("tiny"))).parent
    ours, openpi = JaxCheckpoint(ours_dir), JaxCheckpoint(golden_dir / JAX_DIRS[0])
    for path in ("PaliGemma/llm/layers/mlp/gating_einsum", "PaliGemma/llm/embedder/input_embedding"):
        a, b = ours._open(path).spec().to_json()["metadata"], openpi._open(path).spec().to_json()["metadata"]
        assert a["chunks"] == b["chunks"] == a["shape"]  # one chunk for the whole array
        assert a["compressor"] == b["compressor"] == {"id": "zstd", "level": 1}


@pytest.mark.parametrize("layer_chunks", [False, True])
def test_stacked_arrays_are_decoded_once_per_chunk_and_bit_identical(tmp_path, layer_chunks):
    cfg = get_config("tiny")
    plan = array_plan(cfg)
    write_jax_checkpoint(tmp_path / "ckpt", random_arrays(cfg, seed=3), layer_chunks=layer_chunks)
    ckpt = JaxCheckpoint(tmp_path / "ckpt")
    stacked = [e for e in plan if e.targets[0][1] is not None]
    assert len(stacked) == 32 and {len(ckpt.shape(e.path)) for e in stacked} >= {2, 3, 4, 5}

    before = _chunk_decodes()
    params = dict(iter_parameters(ckpt, plan))
    decodes = _chunk_decodes() - before
    # one chunk per array (openpi), or one per layer of every array of 2+ dimensions; never more.
    chunks = sum(ckpt.shape(e.path)[0] if layer_chunks and len(ckpt.shape(e.path)) > 1 else 1 for e in plan)
    assert decodes == chunks, (decodes, chunks)
    # Reading every layer on its own (the old reader) would decode a one-chunk array once per layer:
    layer_reads = sum(len({t[1] for t in e.targets}) for e in stacked) + len(plan) - len(stacked)
    assert layer_reads > chunks or layer_chunks

    # the same tensors as slicing the whole array in memory, bit for bit
    expected = {name: fn(ckpt.read(e.path)[i] if i is not None else ckpt.read(e.path))
                for e in plan for name, i, fn in e.targets}
    assert list(params) == list(expected) and len(params) == sum(len(e.targets) for e in plan)
    for name, tensor in params.items():
        assert torch.equal(tensor, torch.from_numpy(np.ascontiguousarray(expected[name]))), name


def test_layers_read_of_a_one_chunk_array_touches_it_once(tmp_path):
    depth, rows = 6, 8
    stack = np.random.default_rng(0).standard_normal((depth, rows, 4), dtype=np.float32)
    write_jax_checkpoint(tmp_path / "c", [("a/stack", stack)])
    ckpt = JaxCheckpoint(tmp_path / "c")
    before = _chunk_decodes()
    layers = list(ckpt.layers("a/stack"))
    assert _chunk_decodes() - before == 1
    assert [i for i, _ in layers] == list(range(depth))
    assert all(np.array_equal(layer, stack[i]) for i, layer in layers)
    before = _chunk_decodes()
    for i in range(depth):  # what reading layer by layer costs on the same array
        ckpt.read("a/stack", i)
    assert _chunk_decodes() - before == depth
