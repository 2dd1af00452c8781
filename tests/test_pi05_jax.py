"""openpi JAX (orbax OCDBT + zarr) checkpoints, read without JAX; conversion to PyTorch."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from policy.convert import convert
from policy.pi05.jax_checkpoint import JaxCheckpoint, write_jax_checkpoint
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
