"""The runner's small pieces, without LIBERO: the config hash, provenance's code version, the progress
bar's counts, device / num_envs / latency / render-device resolution."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from runners.build import resolve_device
from runners.evaluate import NOT_HASHED, config_hash, parse_latency, resolve_num_envs
from runners.pool import render_environ
from runners.progress import Progress
from runners.provenance import code_version

REPO = Path(__file__).resolve().parents[1]


def _compose(config_name="evaluate", overrides=(), hydra=False):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture(scope="module")
def base():
    return _compose()


@pytest.fixture(scope="module")
def remote():
    return _compose(overrides=["policy=remote"])


def _with(cfg, **changes):
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in changes.items():
            OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return cfg


# ----- config_hash ----------------------------------------------------------------------------------

def test_config_hash_is_stable_for_the_same_config(base):
    again = _compose()  # composed anew: not the same object
    assert config_hash(base) == config_hash(again) == config_hash(base.copy())
    assert len(config_hash(base)) == 12 and int(config_hash(base), 16) >= 0


@pytest.mark.parametrize("key, value", [("replan", 7), ("suite", "libero_object"),
                                        ("execution", "async"), ("latency_ms", 100), ("seed", 8),
                                        ("chunking", "ensemble"), ("env__camera_size", 128),
                                        ("policy__chunk_size", 5)])
def test_a_result_changing_setting_changes_the_hash(base, key, value):
    assert OmegaConf.select(base, key.replace("__", ".")) != value  # a real change
    assert config_hash(_with(base, **{key: value})) != config_hash(base)


def test_steps_and_backend_change_the_hash_of_the_policy_that_reads_them_only(base):
    pi05 = _compose(overrides=["policy=pi05"])
    assert config_hash(_with(pi05, steps=3)) != config_hash(pi05) != config_hash(_with(pi05, backend="compile"))
    assert config_hash(_with(base, steps=3)) == config_hash(_with(base, backend="fp8")) == config_hash(base)


def test_two_spellings_of_one_setting_share_a_hash():
    def h(*overrides):
        return config_hash(_compose(overrides=list(overrides)))

    assert h("execution=async", "latency_ms=100") == h("execution=async", "latency_ms=100.0")
    assert h("execution=async", "latency_ms=100") != h("execution=async", "latency_ms=150")
    assert h("perturb=lighting", "perturb.severity=0.5") == h("perturb=lighting", "perturb.lighting.severity=0.5")
    assert h("perturb=lighting", "perturb.severity=0.5") != h("perturb=lighting", "perturb.severity=0.7")
    assert h("perturb=lighting") != h()


@pytest.mark.parametrize("key, value", [("num_envs", 16), ("videos", "all"), ("out", "/elsewhere"),
                                        ("device", "cuda:3"), ("vectorization", "sync"), ("video_stride", 2),
                                        ("render_device", "cpu"), ("retry_errors", False)])
def test_a_setting_that_does_not_change_results_leaves_the_hash(base, key, value):
    assert key in NOT_HASHED
    assert config_hash(_with(base, **{key: value})) == config_hash(base)


def test_the_policy_identity_is_part_of_the_hash(base):
    a = config_hash(base, {"checkpoint_sha256": "aa" * 32, "checkpoint_format": "jax"})
    b = config_hash(base, {"checkpoint_sha256": "bb" * 32, "checkpoint_format": "jax"})
    assert len({config_hash(base), a, b}) == 3
    assert a == config_hash(base.copy(), {"checkpoint_format": "jax", "checkpoint_sha256": "aa" * 32})


def test_a_checkpoints_path_does_not_change_the_hash_its_files_content_does(tmp_path, tiny_checkpoint, spm_tokenizer):
    """README: the identity is the checkpoint's content, not its path. A moved copy, another node's mount
    point or a trailing slash used to refuse a resume; a tokenizer file counts by content too."""
    from runners.build import policy_identity

    def h(checkpoint, tokenizer):
        cfg = _compose(overrides=["policy=pi05", f"policy.checkpoint={checkpoint}", f"policy.tokenizer={tokenizer}",
                                  "policy.config=tiny"])
        return config_hash(cfg, policy_identity(cfg))

    moved = tmp_path / "moved" / "pi05_tiny"
    shutil.copytree(tiny_checkpoint, moved)
    tok = tmp_path / "tok.model"
    shutil.copy(spm_tokenizer, tok)
    here = h(tiny_checkpoint, spm_tokenizer)
    assert h(moved, tok) == h(f"{moved}/", tok) == here
    other_tok = tmp_path / "other.model"
    other_tok.write_bytes(Path(spm_tokenizer).read_bytes() + b"\0")
    assert h(moved, other_tok) != here
    data = (moved / "model.safetensors").read_bytes()
    (moved / "model.safetensors").write_bytes(data[:-4] + bytes(4 * [7]))  # other weights, same layout
    assert h(moved, tok) != here


def test_a_remote_policys_address_and_credentials_do_not_change_the_hash(remote):
    h = config_hash(remote)
    for key, value in (("host", "gpu-box.example"), ("port", 9000), ("policy__host", "10.0.0.2"),
                       ("policy__port", 8123), ("policy__api_key", "s3cret"), ("policy__timeout_s", 5)):
        assert config_hash(_with(remote, **{key: value})) == h, key
    assert config_hash(_with(remote, steps=3)) == h  # a server runs its own steps: its identity says which
    # what the server runs does change it (runners/build.py policy_identity)
    assert config_hash(remote, {"model": "pi05_libero", "steps": 10}) != config_hash(remote, {"model": "x", "steps": 10})


# ----- provenance.code_version ----------------------------------------------------------------------

def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_code_version_is_our_checkouts_commit():
    if not (REPO / ".git").exists():
        pytest.skip("not run from a git checkout")
    version = code_version.__wrapped__(REPO)  # uncached
    assert version["git_commit"] == _git(REPO, "rev-parse", "HEAD")
    assert isinstance(version["git_dirty"], bool)


def _other_repo(root: Path) -> str:
    root.mkdir()
    _git(root, "init", "-q")
    (root / "README").write_text("someone else's project\n")
    _git(root, "add", "README")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "theirs")
    return _git(root, "rev-parse", "HEAD")


@pytest.mark.parametrize("layout", ["vendored", "top_level"])
def test_code_copied_into_another_repository_records_the_package_version(tmp_path, layout):
    """Copied into some other git repository (vendored in a subfolder with our pyproject.toml, or its
    packages dropped at that repository's top level), the code must not claim that repository's commit."""
    theirs = _other_repo(tmp_path / "other")
    dest = tmp_path / "other" / "third_party" / "pi05-harness" if layout == "vendored" else tmp_path / "other"
    (dest / "runners").mkdir(parents=True)
    for name in ("__init__.py", "provenance.py"):
        shutil.copy(REPO / "runners" / name, dest / "runners" / name)
    shutil.copytree(REPO / "conf", dest / "conf")
    if layout == "vendored":
        shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    proc = subprocess.run([sys.executable, "-c", "import json, runners.provenance as p; "
                           "print(p.CODE_ROOT); print(json.dumps(p.code_version()))"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(dest)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    root, line = proc.stdout.strip().splitlines()
    assert Path(root) == dest.resolve()  # the copy ran, not our checkout
    version = json.loads(line)
    assert version["git_commit"] is None and theirs not in proc.stdout
    from importlib.metadata import version as pkg_version

    assert version["package_version"] == pkg_version("pi05-harness")


# ----- progress ---------------------------------------------------------------------------------------

def test_progress_counts_successes_and_errors_and_resumes_from_done_records():
    done = [{"success": True}, {"success": False}, {"success": False, "error": "EGL died"}, {"success": True}]
    p = Progress(total=10, done=done)
    try:
        assert (p.successes, p.finished, p.errors, p.bar.n) == (2, 3, 1, 4)
        assert p.bar.postfix == "success 66.7% (2/3), errors 1"
        p.update({"success": True})
        p.update({"success": False, "error": "timeout"})
        p.update({"success": False})
        assert (p.successes, p.finished, p.errors, p.bar.n) == (3, 5, 2, 7)
        assert p.bar.postfix == "success 60.0% (3/5), errors 2"
    finally:
        p.close()
    fresh = Progress(total=2, done=[])
    try:
        assert fresh.bar.postfix == "success - (0/0), errors 0" and fresh.bar.n == 0
    finally:
        fresh.close()


# ----- resolve_device ---------------------------------------------------------------------------------

@pytest.fixture
def fake_gpus(monkeypatch):
    import torch

    def set_gpus(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_gpus


@pytest.fixture
def hydra_job():
    from hydra.core.hydra_config import HydraConfig

    def set_job(num, multirun=True):
        cfg = _compose("sweep" if multirun else "evaluate", hydra=True)
        with open_dict(cfg):
            cfg.hydra.job.num = num
        HydraConfig.instance().set_config(cfg)
    yield set_job
    HydraConfig.instance().cfg = None


def test_auto_device_without_cuda_is_the_cpu(fake_gpus):
    fake_gpus(0)
    assert resolve_device("auto") == "cpu"


@pytest.mark.parametrize("explicit", ["cpu", "cuda", "cuda:1", "mps"])
def test_an_explicit_device_passes_through(fake_gpus, hydra_job, explicit):
    fake_gpus(4)
    hydra_job(5)
    assert resolve_device(explicit) == explicit


def test_multirun_job_k_gets_gpu_k_mod_n(fake_gpus, hydra_job):
    fake_gpus(3)
    assert resolve_device("auto") == "cuda:0"  # outside Hydra
    got = []
    for k in range(7):
        hydra_job(k)
        got.append(resolve_device("auto"))
    assert got == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    hydra_job(4, multirun=False)  # a single run keeps the first GPU whatever its job number
    assert resolve_device("auto") == "cuda:0"


# ----- num_envs, latency_ms, render_device ------------------------------------------------------------

def test_resolve_num_envs(monkeypatch):
    assert resolve_num_envs(4) == resolve_num_envs("4") == 4
    for cores, expected in ((16, 24), (2, 3), (1, 2), (None, 3)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        assert resolve_num_envs("auto") == resolve_num_envs(" AUTO ") == expected
    with pytest.raises(ValueError, match="num_envs must be >= 1, got 0"):
        resolve_num_envs(0)
    for bad in ("four", None, "2.5"):
        with pytest.raises(ValueError, match="num_envs must be a positive number or 'auto', got"):
            resolve_num_envs(bad)


def test_parse_latency():
    assert parse_latency(0) == 0.0 and parse_latency("25") == 25.0 and parse_latency(12.5) == 12.5
    assert parse_latency("measured") is None and parse_latency(" Measured ") is None
    for bad in ("fast", None, "10ms"):
        with pytest.raises(ValueError, match="latency_ms must be a number of milliseconds or 'measured', got"):
            parse_latency(bad)
    for bad in (-1, "-0.5", "inf", float("nan"), 60_001):
        with pytest.raises(ValueError, match="latency_ms must be between 0 and 60000 ms"):
            parse_latency(bad)


def test_render_environ(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert render_environ("cpu") == {"MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    assert render_environ("auto", "cuda:2") == {"MUJOCO_EGL_DEVICE_ID": "2"}  # a sweep job renders on its GPU
    assert render_environ("auto", "cpu") == render_environ("auto", None) == render_environ("auto", "cuda") == {}
    assert render_environ(" 3 ") == render_environ(3, "cuda:1") == {"MUJOCO_EGL_DEVICE_ID": "3"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # cuda:0 is then physical GPU 5: EGL's numbering differs
    assert render_environ("auto", "cuda:0") == {}
    for bad in ("gpu", "cuda:0", "-1"):
        with pytest.raises(ValueError, match="render_device must be auto, cpu or an EGL device number, got"):
            render_environ(bad)


def test_the_default_checkpoint_is_identified_by_its_content(tmp_path, monkeypatch, tiny_checkpoint):
    """policy.checkpoint=null means openpi's cache: the checkpoint found there is hashed, not skipped."""
    from runners.build import policy_identity

    home = tmp_path / "openpi"
    shutil.copytree(tiny_checkpoint, home / "openpi-assets" / "checkpoints" / "pi05_libero")
    monkeypatch.setenv("OPENPI_DATA_HOME", str(home))
    default = _compose(overrides=["policy=pi05"])
    explicit = _compose(overrides=["policy=pi05", f"policy.checkpoint={tiny_checkpoint}"])
    ident = policy_identity(default)
    assert ident is not None and ident == policy_identity(explicit)  # same weights, another path: same identity
    assert len(ident["checkpoint_sha256"]) == 64
