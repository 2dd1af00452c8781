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


def test_the_serial_parts_settings_are_checked_before_the_main_run(tmp_path, monkeypatch):
    """serial_episodes=0 used to fail after the whole main run, which then could not be re-run into the
    same out= (a benchmark times a fresh run): an expensive GPU timing lost to a typo."""
    import runners.bench_eval as be

    monkeypatch.setattr(be, "evaluate", lambda *a, **k: pytest.fail("the main run started"))
    for override, why in (("serial_episodes=0", "serial_episodes must be >= 1, got 0"),
                          ("serial_episodes=abc", "serial_episodes must be a whole number"),
                          ("time_limit_s=-5", "time_limit_s must be a positive number"),
                          ("time_limit_s=soon", "time_limit_s must be a positive number")):
        with pytest.raises(ValueError, match=why):
            bench(config(*SMALL, override, name="bench_eval"), tmp_path / override.split("=")[0])
