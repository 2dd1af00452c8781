"""Pi0.5 around the model: tokenizer formats, LIBERO transforms, the policy object, early errors."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import torch

from policy.libero_policy import Pi05Policy
from policy.pi05.tokenizer import PaligemmaTokenizer, clean, discretize_state
from policy.pi05.transforms import NormStats, find_norm_stats, to_libero_actions, to_model_images


def test_pi0_prompt_format_bos_text_then_newline(spm_tokenizer):
    tok = PaligemmaTokenizer(spm_tokenizer, max_len=48)
    sp = spm.SentencePieceProcessor(model_file=str(spm_tokenizer))
    tokens, mask = tok.encode("  pick_up the black bowl\n")
    expected = [2] + sp.encode("pick up the black bowl") + sp.encode("\n")  # strip, then _ -> space
    assert tokens[: mask.sum()].tolist() == expected
    assert mask[: len(expected)].all() and not mask[len(expected):].any() and (tokens[len(expected):] == 0).all()
    assert tokens.dtype == np.int64 and tokens.shape == (48,)
    assert clean(" a_b\nc ") == "a b c"  # no lower-casing, no other changes
    assert clean("Open The Drawer") == "Open The Drawer"


def test_pi05_discrete_state_format(spm_tokenizer):
    tok = PaligemmaTokenizer(spm_tokenizer, max_len=200)
    sp = spm.SentencePieceProcessor(model_file=str(spm_tokenizer))
    state = np.array([-1.0, 0.0, 0.99, 1.5, -3.0])
    assert discretize_state(state).tolist() == [0, 128, 254, 255, -1]
    tokens, mask = tok.encode("put the bowl", state)
    text = "Task: put the bowl, State: 0 128 254 255 -1;\nAction: "
    assert tokens[: mask.sum()].tolist() == sp.encode(text, add_bos=True)


def test_truncation_warns(spm_tokenizer, caplog):
    tok = PaligemmaTokenizer(spm_tokenizer, max_len=5)
    with caplog.at_level("WARNING"):
        tokens, mask = tok.encode("pick up the black bowl and place it on the plate")
    assert mask.all() and "truncated" in caplog.text


def test_missing_tokenizer_explains_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="gs://big_vision/paligemma_tokenizer.model"):
        PaligemmaTokenizer(tmp_path / "nope.model")


def test_libero_images_go_to_the_first_two_slots_and_the_third_is_masked():
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8),
             "wrist_image": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)}
    slots, masks = to_model_images(batch)
    assert [s.shape for s in slots] == [(2, 3, 224, 224)] * 3
    np.testing.assert_allclose(slots[0][1, :, 5, 7], batch["image"][1, 5, 7] / 255 * 2 - 1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(slots[1][0].transpose(1, 2, 0), batch["wrist_image"][0] / 255 * 2 - 1, atol=1e-6)
    assert (slots[2] == -1).all() and [m.tolist() for m in masks] == [[True, True], [True, True], [False, False]]
    small = {"image": batch["image"][:, :200], "wrist_image": batch["wrist_image"][:, :200]}  # resized with pad
    s, _ = to_model_images(small)
    assert s[0].shape == (2, 3, 224, 224) and (s[0][:, :, :10] == -1).all()  # black padding bars


@pytest.mark.parametrize("image, wrist, message", [
    ((224, 224, 3), (1, 224, 224, 3), r"got shape \(224, 224, 3\): add the batch axis"),
    ((1, 3, 224, 224), (1, 224, 224, 3), r"RGB images \(B, H, W, 3\), got shape \(1, 3, 224, 224\)"),
    ((2, 224, 224, 3), (1, 224, 224, 3), "holds 2 images and batch\\['wrist_image'\\] 1"),
    ((1, 0, 224, 3), (1, 224, 224, 3), "got shape"),
])
def test_images_of_the_wrong_shape_are_refused_by_name(image, wrist, message):
    """A channels-first or unbatched image was resized into a wrong picture (or failed deep in the
    resize) and the model acted on it."""
    batch = {"image": np.zeros(image, np.uint8), "wrist_image": np.zeros(wrist, np.uint8)}
    with pytest.raises(ValueError, match=message):
        to_model_images(batch)


def test_quantile_unnormalization_of_the_first_seven_dims(golden_dir):
    stats = NormStats.load(find_norm_stats(golden_dir / "tiny_openpi_jax"))
    raw = json.loads((golden_dir / "tiny_openpi_jax/assets/physical-intelligence/libero/norm_stats.json").read_text())
    q01, q99 = np.array(raw["norm_stats"]["actions"]["q01"]), np.array(raw["norm_stats"]["actions"]["q99"])
    x = np.random.default_rng(2).uniform(-1, 1, (3, 10, 32)).astype(np.float32)
    out = to_libero_actions(x, stats)
    assert out.shape == (3, 10, 7)
    np.testing.assert_allclose(out, (x[..., :7] + 1) / 2 * (q99 - q01 + 1e-6) + q01, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.normalize("actions", out), x[..., :7], atol=1e-5)


BAD_NORM_STATS = {  # what a hand-written or half-copied norm_stats.json can hold, and the error that names it
    "short actions": ({"actions": {"q01": [-1] * 5, "q99": [1] * 5}}, "'actions' statistics cover 5 dims, 7 are needed"),
    "lengths differ": ({"actions": {"q01": [-1] * 5, "q99": [1] * 7}}, "lists of one length, got shapes \\[5\\] and \\[7\\]"),
    "NaN": ({"actions": {"q01": [-1] * 6 + [float("nan")], "q99": [1] * 7}}, "NaN or infinite"),
    "scalar": ({"actions": {"q01": -1, "q99": 1}}, "lists of one length"),
    "nested": ({"actions": {"q01": [[-1] * 7], "q99": [[1] * 7]}}, "lists of one length"),
    "words": ({"actions": {"q01": ["a"] * 7, "q99": [1] * 7}}, "not lists of numbers"),
    "swapped": ({"actions": {"q01": [1] * 7, "q99": [-1] * 7}}, "q01 > q99 in dims \\[0, 1, 2, 3, 4, 5, 6\\]"),
    "a list": ([1, 2], "'norm_stats' is a list"),
    "stats a list": ({"actions": [1, 2]}, "'actions' has no q01/q99"),
    "no actions": ({"state": {"q01": [-1] * 8, "q99": [1] * 8}}, "no 'actions' statistics"),
}


@pytest.mark.parametrize("name", BAD_NORM_STATS)
def test_bad_norm_stats_are_refused_when_loaded_naming_the_file(tmp_path, name):
    """Short action quantiles used to leave the rotation and gripper dims normalized without a word, and
    NaN or misshapen ones to fail (or give NaN actions) at the first call, behind a server as 'policy error'."""
    data, why = BAD_NORM_STATS[name]
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": data}))
    with pytest.raises(ValueError, match=why) as info:
        NormStats.load(path)
    assert str(path) in str(info.value)


def test_settings_are_checked_before_the_weights_are_read(tiny_checkpoint, spm_tokenizer, tmp_path, monkeypatch):
    """A real checkpoint takes minutes to read: a typo in steps, dtype or a backend option, or norm stats
    without the state a config puts in its prompt, must fail first."""
    import policy.libero_policy as lp
    from policy.pi05.config import get_config

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were read before the settings were checked")

    monkeypatch.setattr(lp, "load_model", no_loading)
    for kwargs, why in (({"num_steps": 0}, "num_steps .* >= 1, got 0"), ({"num_steps": "3"}, "got '3'"),
                        ({"num_steps": True}, "got True"), ({"dtype": "fp16"}, "dtype must be one of .*got 'fp16'"),
                        ({"dtype": "int8"}, "got 'int8'"),
                        ({"backend_options": {"expert_kernel": "triton"}, "backend": "compile"}, "did you mean expert_kernels"),
                        ({"backend_options": {"emulate": True}, "backend": "eager"}, "backend 'eager' has no option 'emulate'")):
        with pytest.raises(ValueError, match=why):
            Pi05Policy(tiny_checkpoint, spm_tokenizer, config="tiny", **kwargs)
    stats = tmp_path / "actions_only.json"
    stats.write_text(json.dumps({"norm_stats": {"actions": {"q01": [-1] * 7, "q99": [1] * 7}}}))
    discrete = get_config("tiny").replace(discrete_state_input=True)  # as pi05_base
    with pytest.raises(ValueError, match=f"{stats} has no 'state' statistics .*puts the robot state in the prompt"):
        Pi05Policy(tiny_checkpoint, spm_tokenizer, config=discrete, norm_stats=stats)


def test_several_norm_stats_need_a_choice(tmp_path, golden_dir):
    src = golden_dir / "tiny_openpi_jax/assets/physical-intelligence/libero/norm_stats.json"
    for asset in ("a/one", "b/two"):
        (tmp_path / "assets" / asset).mkdir(parents=True)
        shutil.copy(src, tmp_path / "assets" / asset / "norm_stats.json")
    with pytest.raises(ValueError, match="a/one, b/two"):
        find_norm_stats(tmp_path)
    assert find_norm_stats(tmp_path, "b/two").parent.name == "two"
    with pytest.raises(FileNotFoundError, match="assets"):
        find_norm_stats(tmp_path / "nowhere")


def libero_batch(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
            "wrist_image": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
            "state": rng.normal(size=(n, 8)).astype(np.float32),
            "prompt": ["pick up the black bowl and place it on the plate", "open the middle drawer of the cabinet"][:n]}


def test_policy_infers_a_batch_in_one_model_call_and_matches_the_model(tiny_checkpoint, spm_tokenizer):
    policy = Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=3, device="cpu", dtype="float32", config="tiny")
    assert policy.chunk_size == 10
    calls = []
    inner = policy.sampler
    policy.sampler = lambda *a: calls.append(a[0][0].shape[0]) or inner(*a)
    batch = libero_batch()
    out = policy.infer(batch)
    assert calls == [2]  # one call for the whole batch
    assert out["actions"].shape == (2, 10, 7) and np.isfinite(out["actions"]).all()
    # the same computation by hand: transforms, tokenizer, model, unnormalization
    policy.reset()
    images, masks = to_model_images(batch)
    enc = [policy.tokenizer.encode(p) for p in batch["prompt"]]
    tokens = torch.from_numpy(np.stack([t for t, _ in enc]))
    tmask = torch.from_numpy(np.stack([m for _, m in enc]))
    noise = torch.randn(2, 10, 32, generator=policy._generator)
    ref = policy.model.sample_actions([torch.from_numpy(x) for x in images], [torch.from_numpy(m) for m in masks],
                                      tokens, tmask, noise=noise, num_steps=3)
    np.testing.assert_allclose(out["actions"], to_libero_actions(ref.numpy(), policy.norm_stats), atol=1e-5)
    # seeded noise: reset() makes runs repeat
    policy.reset()
    again = policy.infer(batch)
    np.testing.assert_array_equal(again["actions"], out["actions"])


def test_policy_checks_everything_before_loading_weights(tiny_checkpoint, spm_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="eager, compile, fp8, tensorrt"):
        Pi05Policy(tiny_checkpoint, spm_tokenizer, backend="warp", config="tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pi05Policy(tmp_path / "nope", spm_tokenizer, config="tiny")
    with pytest.raises(FileNotFoundError, match="paligemma_tokenizer"):
        Pi05Policy(tiny_checkpoint, tmp_path / "nope.model", config="tiny")
    garbage = tmp_path / "tokenizer.model"  # e.g. an HTML error page saved under the tokenizer's name
    garbage.write_bytes(b"<html>403 Forbidden</html>")
    with pytest.raises(ValueError, match=f"tokenizer file {garbage} is not a SentencePiece model"):
        Pi05Policy(tiny_checkpoint, garbage, config="tiny")
    from policy.pi05.config import get_config

    small = get_config("tiny").replace(vocab_size=100)  # fewer embeddings than the tokenizer's 180 pieces
    with pytest.raises(ValueError, match="has 180 pieces, more than the model's 100 token embeddings"):
        Pi05Policy(tiny_checkpoint, spm_tokenizer, config=small)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_checkpoint / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="norm_stats"):
        Pi05Policy(bare, spm_tokenizer, config="tiny")


def test_random_weights_without_a_tokenizer_file_use_a_stand_in_but_real_weights_do_not(
        tiny_checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path))  # no tokenizer in the cache
    with caplog.at_level("WARNING"):
        policy = Pi05Policy("random", None, num_steps=1, device="cpu", dtype="float32", config="tiny")
    assert "stand-in tokenizer" in caplog.text and policy.tokenizer.path is None
    out = policy.infer(libero_batch())
    assert out["actions"].shape == (2, 10, 7) and np.isfinite(out["actions"]).all()
    with pytest.raises(FileNotFoundError, match="paligemma_tokenizer"):
        Pi05Policy(tiny_checkpoint, None, config="tiny")  # a real checkpoint never gets the stand-in


def _lerobot_copy(tiny_checkpoint, dst):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    save_file({f"model.{k}": v for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "policy_preprocessor.json").write_text("{}")
    return dst


def test_lerobot_checkpoints_are_refused_without_norm_stats_and_load_with_them(tiny_checkpoint, spm_tokenizer,
                                                                              tmp_path):
    lerobot = _lerobot_copy(tiny_checkpoint, tmp_path / "lerobot")
    with pytest.raises(ValueError, match="lerobot conversion.*policy.norm_stats=PATH.*policy.images=raw"):
        Pi05Policy(lerobot, spm_tokenizer, config="tiny")
    stats = next((tiny_checkpoint / "assets").rglob("norm_stats.json"))
    ours = Pi05Policy(lerobot, spm_tokenizer, num_steps=2, device="cpu", dtype="float32", config="tiny", norm_stats=stats)
    theirs = Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=2, device="cpu", dtype="float32", config="tiny")
    np.testing.assert_array_equal(ours.infer(libero_batch())["actions"], theirs.infer(libero_batch())["actions"])


def test_a_truncated_checkpoint_names_its_file(tiny_checkpoint, spm_tokenizer, tmp_path):
    from policy.pi05.checkpoints import checkpoint_identity

    cut = tmp_path / "cut"
    shutil.copytree(tiny_checkpoint, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{cut / 'model.safetensors'} is truncated"):
        Pi05Policy(cut, spm_tokenizer, config="tiny")
    a, b = checkpoint_identity(tiny_checkpoint), checkpoint_identity(tiny_checkpoint / "model.safetensors")
    assert a["sha256"] == b["sha256"] and a["format"] == "pytorch" and len(a["sha256"]) == 64


@pytest.mark.parametrize("sampled", [False, True], ids=["read-whole", "sampled"])
def test_checkpoint_identity_tells_weights_of_one_layout_apart(tiny_checkpoint, golden_dir, tmp_path, monkeypatch, sampled):
    """Two fine-tunes of one model share every name, shape and offset: the identity (on every result line,
    in the config hash a resumed run is checked against) must still differ; a copy elsewhere must not."""
    from safetensors.torch import load_file, save_file

    from policy.pi05 import checkpoints
    from policy.pi05.jax_checkpoint import JaxCheckpoint, write_jax_checkpoint

    if sampled:  # the sampled path of a multi-gigabyte file, on the tiny one
        monkeypatch.setattr(checkpoints, "IDENTITY_SAMPLES", 64)
        monkeypatch.setattr(checkpoints, "IDENTITY_WINDOW", 32)
    identity = checkpoints.checkpoint_identity
    copy, tuned = tmp_path / "copy", tmp_path / "tuned"
    shutil.copytree(tiny_checkpoint, copy)
    shutil.copytree(tiny_checkpoint, tuned)
    tensors = load_file(tuned / "model.safetensors")
    name = max(tensors, key=lambda k: tensors[k].numel())  # the largest matrix, nudged: a fine-tune's kind of change
    tensors[name] = tensors[name] + 1e-3
    header = checkpoints._safetensors_header(tuned / "model.safetensors")
    save_file(tensors, tuned / "model.safetensors", metadata=json.loads(header).get("__metadata__"))
    assert checkpoints._safetensors_header(tuned / "model.safetensors") == header  # one layout
    assert identity(copy)["sha256"] == identity(tiny_checkpoint)["sha256"]
    assert identity(tuned)["sha256"] != identity(tiny_checkpoint)["sha256"]
    src = JaxCheckpoint(golden_dir / "tiny_openpi_jax_pure")
    write_jax_checkpoint(tmp_path / "jax_a", ((p, src.read(p)) for p in src.names))
    write_jax_checkpoint(tmp_path / "jax_b", ((p, src.read(p) * (1.001 if "einsum" in p else 1.0)) for p in src.names))
    a, b = identity(tmp_path / "jax_a"), identity(tmp_path / "jax_b")
    assert (tmp_path / "jax_a" / "params" / "_METADATA").read_bytes() == (tmp_path / "jax_b" / "params" / "_METADATA").read_bytes()
    assert a["format"] == "jax" and a["sha256"] != b["sha256"]
    assert identity(golden_dir / "tiny_openpi_jax_pure")["sha256"] == identity(golden_dir / "tiny_openpi_jax_pure")["sha256"]


def test_non_float_non_finite_or_corrupt_safetensors_are_refused_by_name(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from policy.pi05.checkpoints import load_model
    from policy.pi05.weights import CheckpointMismatch

    tensors = load_file(tiny_checkpoint / "model.safetensors")
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    save_file({**tensors, name: tensors[name].to(torch.int32)}, tmp_path / "ints.safetensors")
    with pytest.raises(CheckpointMismatch, match=f"wrong dtype: {name}: checkpoint I32"):
        load_model(tmp_path / "ints.safetensors", config="tiny")
    poisoned = tensors[name].clone()
    poisoned.view(-1)[3] = float("inf")
    save_file({**tensors, name: poisoned}, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointMismatch, match="inf.safetensors holds NaN or infinite values in 1 tensors"):
        load_model(tmp_path / "inf.safetensors", config="tiny")
    header = b'[1, 2]'  # valid JSON, not a safetensors header
    (tmp_path / "list.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_model(tmp_path / "list.safetensors", config="tiny")


def test_raw_image_orientation_rotates_frames_back_before_the_model(tiny_checkpoint, spm_tokenizer):
    upright = Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=1, device="cpu", dtype="float32", config="tiny")
    raw = Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=1, device="cpu", dtype="float32", config="tiny",
                     images="raw")
    batch = libero_batch()
    turned = {**batch, "image": batch["image"][:, ::-1, ::-1], "wrist_image": batch["wrist_image"][:, ::-1, ::-1]}
    np.testing.assert_array_equal(raw.infer(turned)["actions"], upright.infer(batch)["actions"])
    with pytest.raises(ValueError, match="upright, raw"):
        Pi05Policy(tiny_checkpoint, spm_tokenizer, config="tiny", images="sideways")


def test_padded_batches_give_each_real_row_what_an_unpadded_call_gives(tiny_checkpoint, spm_tokenizer):
    plain = Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=2, device="cpu", dtype="float32", config="tiny")
    padded = Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=2, device="cpu", dtype="float32", config="tiny")
    padded.static_shapes = True  # as the compile/fp8 backends have
    seen = []
    inner = padded.sampler
    padded.sampler = lambda *a: seen.append(a[2].shape[0]) or inner(*a)
    rng = np.random.default_rng(3)
    batch = {"image": rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8),
             "wrist_image": rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8),
             "state": rng.normal(size=(3, 8)).astype(np.float32), "prompt": ["a", "pick up the bowl", "b"]}
    out = padded.infer(batch)
    assert seen == [4] and out["actions"].shape == (3, 10, 7) and out["policy_timing"]["padded_batch"] == 4
    np.testing.assert_allclose(out["actions"], plain.infer(batch)["actions"], atol=1e-5)
    # the noise generator advanced as for 3 rows: the next call matches too
    np.testing.assert_allclose(padded.infer(batch)["actions"], plain.infer(batch)["actions"], atol=1e-5)
    assert [padded.padded_size(b) for b in (1, 2, 3, 5, 9, 16, 17, 70)] == [1, 2, 4, 8, 16, 16, 24, 128]
    assert sorted(padded.prepare(5)) == [1, 2, 4, 8] and plain.prepare(5) == {}


def test_noise_follows_the_episode_and_step_not_the_batch(tiny_checkpoint, spm_tokenizer):
    policy = Pi05Policy(tiny_checkpoint, spm_tokenizer, num_steps=2, device="cpu", dtype="float32", config="tiny")
    batch = libero_batch()
    batch["episode"], batch["step"] = [("libero_spatial", 0, 3, 7), ("libero_spatial", 4, 1, 7)], [0, 5]
    both = policy.infer(batch)["actions"]
    swapped = {k: v[::-1] if not isinstance(v, list) else v[::-1] for k, v in batch.items()}
    np.testing.assert_allclose(policy.infer(swapped)["actions"][::-1], both, atol=1e-5)  # order does not matter
    alone = {k: v[1:] for k, v in batch.items()}
    np.testing.assert_allclose(policy.infer(alone)["actions"][0], both[1], atol=1e-5)  # nor the other rows
    later = dict(batch, step=[0, 10])
    moved = policy.infer(later)["actions"]
    np.testing.assert_allclose(moved[0], both[0], atol=1e-5)
    assert not np.allclose(moved[1], both[1])  # another step of the same episode: other noise


def test_a_checkpoints_action_horizon_is_used_and_checked(tiny_checkpoint, tmp_path):
    """config.json's action_horizon sets the chunk size; `true` passed as 1 (a bool is an int) and 0 or
    a negative one made a model that predicts no actions."""
    from policy.pi05.checkpoints import load_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "config.json").write_text(json.dumps({"action_horizon": 7}))
    assert load_model(ckpt, "tiny", dtype="float32").config.chunk_size == 7
    for bad in (True, 0, -5, "10", 10**6):
        (ckpt / "config.json").write_text(json.dumps({"action_horizon": bad}))
        with pytest.raises(ValueError, match=f"{ckpt / 'config.json'}: action_horizon must be a whole number"):
            load_model(ckpt, "tiny", dtype="float32")
    (ckpt / "config.json").write_text(json.dumps(["not", "openpi's"]))  # someone else's file: the preset stands
    assert load_model(ckpt, "tiny", dtype="float32").config.chunk_size == 10
