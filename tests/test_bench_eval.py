"""The harness benchmark (runners/bench_eval.py) on real LIBERO, shrunk: its rates, and a fresh run only."""

import json

import pytest

from helpers import config
from runners.bench_eval import RESULT_FILE, bench

SMALL = ["policy=zero", "tasks=[0]", "init_states=[0,1]", "num_envs=2", "max_steps=15", "videos=none",
         "env.camera_size=64", "env.image_size=64", "serial_episodes=1"]


def test_rates_come_from_this_run_and_a_used_folder_is_refused(tmp_path):
    cfg = config(*SMALL, name="bench_eval")
    result = bench(cfg, tmp_path)
    assert result["episodes"] == 2 and result["errors"] == 0 and result["num_envs"] == 2
    assert result["phases"]["env_steps"] == 30 and result["serial"]["episodes"] == 1
    # the rate is rounded to one decimal: on a slow machine (a few steps a second) that is more than 1 %
    assert result["env_steps_per_s"] == pytest.approx(30 / result["loop_s"], abs=0.05 + 1e-9)
    assert result["speedup_vs_serial"] > 0
    assert json.loads((tmp_path / RESULT_FILE).read_text())["episodes"] == 2
    before = (tmp_path / "main" / "results.jsonl").read_text()
    # a second benchmark into the same folder would resume it and count the first run's episodes as its own
    with pytest.raises(ValueError, match="already holds results.*new out="):
        bench(cfg, tmp_path)
    assert (tmp_path / "main" / "results.jsonl").read_text() == before
