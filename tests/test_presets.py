"""Experiment presets (conf/experiment/): each composes, holds only its differences, and runs shrunk."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
SHRINK = ["tasks=[0]", "episodes=1", "max_steps=5", "num_envs=1", "vectorization=sync", "videos=none",
          "env.camera_size=64", "env.image_size=64"]


def compose_sweep(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="sweep", overrides=list(overrides), return_hydra_config=True)


def test_every_preset_says_what_it_answers_and_how_long_it_takes():
    assert {"pi05_libero_paper", "steps_backends", "latency_pi05", "latency_scripted", "robustness_scripted",
            "libero_pro_scripted", "robustness_pi05", "smoke", "demo"} <= set(PRESETS)
    for name in PRESETS:
        text = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name
        assert "?" in text.split("defaults")[0], f"{name}: its comment should ask its question"
        assert "python -m runners." in text, f"{name}: its comment should show the command"


def test_the_paper_preset_is_openpis_protocol_on_the_four_suites():
    cfg = compose_sweep("+experiment=pi05_libero_paper")
    assert cfg.policy._target_ == "policy.libero_policy.Pi05Policy"
    assert (cfg.seed, cfg.settle_steps, cfg.replan, cfg.episodes, cfg.max_steps) == (7, 10, 5, 50, None)
    assert cfg.hydra.sweeper.params.suite == "libero_spatial,libero_object,libero_goal,libero_10"
    assert cfg.reproduce == "pi05_libero_openpi"
    steps = compose_sweep("+experiment=steps_backends")
    assert steps.hydra.sweeper.params.steps == "1,3,10" and steps.hydra.sweeper.params.backend == "eager,compile,fp8"


def _pi05(tiny_checkpoint, spm_tokenizer):
    return [f"policy.checkpoint={tiny_checkpoint}", "policy.config=tiny", "policy.dtype=float32",
            f"policy.tokenizer={spm_tokenizer}"]


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_runs_shrunk(name, tmp_path, tiny_checkpoint, spm_tokenizer):
    extra = []
    if name in ("pi05_libero_paper", "steps_backends", "latency_pi05", "robustness_pi05"):
        extra = _pi05(tiny_checkpoint, spm_tokenizer) + ["steps=1", "backend=eager", "suite=libero_spatial"]
    if name == "latency_pi05":
        extra += ["execution=rtc"]
    if name == "latency_scripted":
        extra += ["suite=libero_object", "latency_ms=0,400"]
    if name in ("robustness_scripted", "robustness_pi05"):
        extra += ["perturb=object_init", "perturb.severity=1.0", "suite=libero_spatial"]
    if name == "libero_pro_scripted":
        extra += ["suite=libero_spatial_swap"]
    out = tmp_path / name
    cmd = [sys.executable, "-m", "runners.sweep", f"+experiment={name}", *SHRINK, *extra, f"out={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (2 if name == "latency_scripted" else 1) and all(r["errors"] == "0" for r in rows)
    if name == "pi05_libero_paper":  # the preset ends with the reproduction check
        report = (out / "reproduce.md").read_text()
        assert "pi05_libero_openpi" in report and "libero_spatial" in report and "episodes per task" in report
