"""The evaluation runner on real LIBERO: replanning, batching, errors, resume, early errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import helpers
from helpers import ChunkPolicy, config
from runners.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
FAST = ["max_steps=12", "vectorization=sync", "videos=none", "env.camera_size=128", "env.image_size=128"]


def lines(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_replanning_executes_exactly_the_first_replan_steps_of_each_chunk(tmp_path):
    helpers.LOGS.clear()
    policy = ChunkPolicy(chunk_size=8)
    cfg = config("tasks=[0]", "init_states=[0]", "replan=5", *FAST)
    evaluate(cfg, tmp_path, policy=policy, make_env=helpers.make_logged_env)
    (log,) = helpers.LOGS
    executed = [a for (_, _, _, a) in log.actions]
    assert len(executed) == 12
    expected = [ChunkPolicy.encode(call, j, 0) for call in range(3) for j in range(5)][:12]
    assert [round(a[0], 6) for a in executed] == expected
    (rec,) = lines(tmp_path)
    assert rec["policy_calls"] == 3 and rec["env_steps"] == 12 and not rec["success"] and rec["error"] == ""


def test_batched_calls_get_one_observation_per_active_env_and_actions_reach_the_right_env(tmp_path):
    helpers.LOGS.clear()
    policy = ChunkPolicy(chunk_size=8)
    cfg = config("tasks=[0,4]", "init_states=[0]", "replan=5", "num_envs=2", *FAST)
    evaluate(cfg, tmp_path, policy=policy, make_env=helpers.make_logged_env)
    assert [c["n"] for c in policy.calls] == [2, 2, 2]  # one call per replan for both envs together
    assert all(len(set(c["prompts"])) == 2 for c in policy.calls)
    for log in helpers.LOGS:
        for task, _, _, action in log.actions:
            code = policy.prompts[task]
            assert round(action[0], 6) in {ChunkPolicy.encode(c, j, code) for c in range(3) for j in range(8)}
    assert sorted(r["task_id"] for r in lines(tmp_path)) == [0, 4]


def test_nan_actions_make_an_error_episode_and_the_run_goes_on(tmp_path):
    cfg = config("tasks=[0,4]", "init_states=[0]", "num_envs=2", *FAST)
    task4 = "wooden cabinet"  # libero_spatial task 4 mentions it; task 0 does not
    policy = ChunkPolicy(chunk_size=8, nan_for=task4)
    summary = evaluate(cfg, tmp_path, policy=policy)
    recs = {r["task_id"]: r for r in lines(tmp_path)}
    assert task4 in recs[4]["task"] and "NaN" in recs[4]["error"] and recs[4]["env_steps"] == 0
    assert recs[0]["error"] == "" and recs[0]["env_steps"] == 12
    assert summary["total"]["errors"] == 1 and summary["total"]["episodes"] == 1


def test_wrong_shape_actions_are_errors(tmp_path):
    class Wrong(ChunkPolicy):
        def infer(self, batch):
            return {"actions": np.zeros((len(batch["prompt"]), 8, 6))}

    evaluate(config("tasks=[0]", "init_states=[0]", *FAST), tmp_path, policy=Wrong())
    (rec,) = lines(tmp_path)
    assert "shape" in rec["error"]


def test_an_env_exception_is_an_error_episode_and_the_slot_goes_on(tmp_path):
    cfg = config("tasks=[0]", "init_states=[0,1]", *FAST)
    evaluate(cfg, tmp_path, policy=ChunkPolicy(), make_env=helpers.make_failing_env)
    recs = {r["init_state_id"]: r for r in lines(tmp_path)}
    assert "simulated MuJoCo failure" in recs[0]["error"] and recs[0]["env_steps"] == 2
    assert recs[1]["error"] == "" and recs[1]["env_steps"] == 12


def test_a_dead_or_hung_worker_is_replaced_and_only_its_episode_errs(tmp_path):
    """Two simulator processes; the worker running init state 1 dies mid-episode (exit 139), the one
    running init state 2 hangs. Each becomes an error episode naming what happened, a fresh worker takes
    the slot, and the other episodes finish normally."""
    import time

    # 20 s: well above a healthy worker's longest answer here (a LIBERO reset while the replacement worker
    # imports robosuite beside it took over 8 s on a loaded 2-core machine, and a healthy episode was killed)
    cfg = config("tasks=[0]", "init_states=[0,1,2,3]", "num_envs=2", "worker_timeout_s=20",
                 *[o for o in FAST if not o.startswith("vectorization")])
    t0 = time.monotonic()
    evaluate(cfg, tmp_path, policy=ChunkPolicy(), make_env=helpers.make_dying_env)
    recs = {r["init_state_id"]: r for r in lines(tmp_path)}
    assert sorted(recs) == [0, 1, 2, 3]
    assert "simulator worker" in recs[1]["error"] and "died (exit code 139)" in recs[1]["error"]
    assert "did not answer within 20 s (hung) and was killed" in recs[2]["error"]
    assert recs[0]["error"] == recs[3]["error"] == "" and recs[0]["env_steps"] == recs[3]["env_steps"] == 12
    assert time.monotonic() - t0 < 240
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"]["errors"] == 2


def test_a_pool_whose_workers_keep_dying_stops_with_a_clear_error():
    from runners.pool import EnvPool, Episode, PoolError

    pool = EnvPool(1, {"suite": "libero_spatial", "task_id": 0, "camera_size": 128, "image_size": 128},
                   make_env=helpers.make_dying_env, max_replacements=0)
    try:
        pool.send_start(0, Episode("libero_spatial", 0, 1, 7), render=False)
        (start,) = pool.collect(wait_for={0})
        assert start.info["error"] == ""
        with pytest.raises(PoolError, match="1 workers have now died or hung in this run: stopping"):
            for _ in range(3):
                pool.send_step(0, np.zeros(7), render=False)
                pool.collect(wait_for={0})
    finally:
        pool.close()


def test_ensemble_chunking_runs_end_to_end(tmp_path):
    helpers.LOGS.clear()
    cfg = config("tasks=[0]", "init_states=[0]", "chunking=ensemble", "ensemble_m=0.0", "replan=2", *FAST)
    evaluate(cfg, tmp_path, policy=ChunkPolicy(chunk_size=4), make_env=helpers.make_logged_env)
    executed = [round(a[0], 6) for (_, _, _, a) in helpers.LOGS[0].actions]
    e = ChunkPolicy.encode
    assert executed[0] == e(0, 0, 0) and executed[1] == e(0, 1, 0)
    assert executed[2] == pytest.approx((e(0, 2, 0) + e(1, 0, 0)) / 2, abs=1e-6)


def test_errors_before_any_environment_is_built(tmp_path, monkeypatch):
    import runners.evaluate as ev

    def no_pool(*a, **k):
        raise AssertionError("an environment was built before the configuration was checked")

    monkeypatch.setattr(ev, "EnvPool", no_pool)
    with pytest.raises(ValueError, match="libero_spatial, libero_object"):
        evaluate(config("suite=libero_nope"), tmp_path)
    with pytest.raises(ValueError, match="0..9"):
        evaluate(config("tasks=[3,12]"), tmp_path)
    with pytest.raises(ValueError, match="init states 0..49"):
        evaluate(config("init_states=[50]"), tmp_path)
    with pytest.raises(ValueError, match="replan <= 10"):
        evaluate(config("replan=11"), tmp_path)


def test_unknown_policy_name_lists_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        config("policy=nope")
    assert "zero" in str(info.value) and "random" in str(info.value)


def _evaluate_cmd(out, *extra):
    return [sys.executable, "-m", "runners.evaluate", "policy=zero", "tasks=[0]", "init_states=[0,1,2,3]",
            "max_steps=6", "videos=failures", f"out={out}", *extra]


def test_killed_evaluation_resumes_without_redoing_finished_episodes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_evaluate_cmd(out), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if results.exists() and len(results.read_text().splitlines()) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("the evaluation ended before it could be killed")
            time.sleep(0.2)
        else:
            pytest.fail("no results within 300 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = results.read_text().splitlines()
    before_complete = [json.loads(x) for x in before if x.endswith("}")]
    assert 2 <= len(before_complete) < 4
    done = subprocess.run(_evaluate_cmd(out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming" in done.stdout
    after = [json.loads(x) for x in results.read_text().splitlines() if x.endswith("}")]
    assert after[: len(before_complete)] == before_complete  # nothing rewritten
    assert sorted(r["init_state_id"] for r in after) == [0, 1, 2, 3]  # nothing redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["episodes"] == 4
    assert not list(out.rglob("*.partial.mp4"))
    assert len(list((out / "videos").rglob("*.mp4"))) == 4


@pytest.mark.parametrize("execution", ["sync", "rtc"])
def test_pi05_policy_in_an_evaluation(tmp_path, tiny_checkpoint, spm_tokenizer, execution):
    latency = "latency_ms=100" if execution == "rtc" else "latency_ms=0"
    cfg = config("policy=pi05", f"policy.checkpoint={tiny_checkpoint}", f"policy.tokenizer={spm_tokenizer}",
                 "policy.config=tiny", "policy.dtype=float32", "steps=2", "tasks=[0]", "init_states=[0]",
                 f"execution={execution}", latency, *FAST)
    summary = evaluate(cfg, tmp_path)
    (rec,) = lines(tmp_path)
    assert rec["error"] == "" and rec["env_steps"] == 12 and rec["policy_calls"] == 3
    assert rec["execution"] == execution and rec["held_steps"] == (2 if execution == "rtc" else 0)
    assert summary["total"]["episodes"] == 1
    assert summary["policy_identity"]["checkpoint_sha256"] == rec["checkpoint_sha256"]


def test_missing_checkpoint_fails_before_any_environment(tmp_path, monkeypatch, spm_tokenizer, tiny_checkpoint):
    import runners.evaluate as ev

    monkeypatch.setattr(ev, "EnvPool", lambda *a, **k: pytest.fail("an environment was built"))
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="openpi-assets/checkpoints/pi05_libero"):
        evaluate(config("policy=pi05", f"policy.tokenizer={spm_tokenizer}", *FAST), tmp_path)
    with pytest.raises(FileNotFoundError, match="paligemma_tokenizer"):  # real weights never get a stand-in
        evaluate(config("policy=pi05", f"policy.checkpoint={tiny_checkpoint}", "policy.config=tiny", *FAST), tmp_path)
    with pytest.raises(ValueError, match="eager, compile, fp8, tensorrt"):
        evaluate(config("policy=pi05", "backend=nope", *FAST), tmp_path)


def test_a_slow_reset_does_not_stall_the_other_slots(tmp_path):
    """Two simulator processes: while one slot starts its episode (slowed by 4 s), the other keeps stepping."""
    import functools

    events = tmp_path / "events.txt"
    make = functools.partial(helpers.make_event_env, path=str(events), slow=(1,), delay_s=4.0)
    cfg = config("tasks=[0]", "init_states=[0,1]", "num_envs=2", "policy=zero", "env.cameras=false",
                 "max_steps=60", "vectorization=async", "videos=none", "env.camera_size=64", "env.image_size=64")
    evaluate(cfg, tmp_path / "run", make_env=make)
    rows = [line.split() for line in events.read_text().splitlines()]
    slow_begin = next(float(t) for e, k, t in rows if e == "reset_begin" and k == "1")
    slow_end = next(float(t) for e, k, t in rows if e == "reset_end" and k == "1")
    steps_meanwhile = [float(t) for e, k, t in rows if e == "step" and k == "0" and slow_begin < float(t) < slow_end]
    # one CPU step takes well under 0.2 s with cameras off: a pool that waited for the reset would show none
    assert len(steps_meanwhile) >= 10, (len(steps_meanwhile), slow_end - slow_begin)
    assert sorted(r["init_state_id"] for r in lines(tmp_path / "run")) == [0, 1]


@pytest.mark.parametrize("call_s", [0.0, 0.25], ids=["instant", "slow"])
def test_async_execution_timing_at_the_env(tmp_path, call_s):
    """latency_ms=100 is 2 steps at 20 Hz: the env holds for 2 steps, then gets each chunk's actions from
    index 2 on; requests every `replan` steps; recorded at the env itself. The simulated latency holds
    however long the call takes on the wall clock (`slow`: 5 steps' worth): the step a chunk is due
    waits for it."""
    helpers.LOGS.clear()
    policy = ChunkPolicy(chunk_size=8, delay_s=call_s)
    cfg = config("tasks=[0]", "init_states=[0]", "replan=3", "execution=async", "latency_ms=100", *FAST)
    evaluate(cfg, tmp_path, policy=policy, make_env=helpers.make_logged_env)
    (log,) = helpers.LOGS
    executed = [a for (_, _, _, a) in log.actions]
    assert len(executed) == 12
    hold = np.array([0, 0, 0, 0, 0, 0, -1.0])
    np.testing.assert_array_equal(executed[0], hold)
    np.testing.assert_array_equal(executed[1], hold)
    # request j at step 3j, usable at 3j + 2, executing index (step - 3j): 2, 3, 4 of each chunk
    expected = [ChunkPolicy.encode(call, j, 0) for call in range(4) for j in (2, 3, 4)][:10]
    assert [round(a[0], 6) for a in executed[2:]] == expected
    assert [c["n"] for c in policy.calls] == [1, 1, 1, 1]
    assert [c["steps"] for c in policy.calls] == [[0], [3], [6], [9]]  # each request's own step, not the slot's
    (rec,) = lines(tmp_path)
    assert rec["execution"] == "async" and rec["sim_latency_ms"] == 100.0 and rec["delay_steps"] == 2
    assert rec["held_steps"] == 2 and rec["policy_calls"] == 4 and rec["chunk_boundary_jump"] is not None


def test_slots_with_actions_step_while_the_policy_thinks_for_another(tmp_path):
    """Two simulator processes whose requests fall at different times (one starts 1 s late) and a policy
    that takes 0.4 s a call: while a call runs for one slot's request, the other slot goes on executing
    its chunk (a loop in lockstep would let it take one step per call at most)."""
    import functools

    events = tmp_path / "events.txt"
    make = functools.partial(helpers.make_event_env, path=str(events), slow=(1,), delay_s=1.0)
    policy = ChunkPolicy(chunk_size=8, delay_s=0.4)
    policy.needs_images = False  # cameras off: the loop sends black frames
    cfg = config("tasks=[0]", "init_states=[0,1]", "num_envs=2", "replan=5", "env.cameras=false", "max_steps=30",
                 "vectorization=async", "videos=none", "env.camera_size=64", "env.image_size=64")
    evaluate(cfg, tmp_path / "run", policy=policy, make_env=make)
    steps = [(int(k), float(t)) for e, k, t in (line.split() for line in events.read_text().splitlines()) if e == "step"]
    during = []  # for each call: steps of the init states NOT in it, taken while it ran
    for c, (began, ended) in zip(policy.calls, policy.times):
        inside = {ep[2] for ep in c["episodes"]}
        during.append(sum(1 for k, t in steps if k not in inside and began < t < ended))
    assert max(during) >= 3, during
    recs = lines(tmp_path / "run")
    assert sorted(r["init_state_id"] for r in recs) == [0, 1] and all(r["error"] == "" for r in recs)
    assert all(r["env_steps"] == 30 and r["policy_calls"] == 6 for r in recs)


def test_async_with_zero_latency_is_bit_identical_to_sync(tmp_path):
    runs = {}
    for execution in ("sync", "async"):
        helpers.LOGS.clear()
        policy = ChunkPolicy(chunk_size=8)
        cfg = config("tasks=[0,4]", "init_states=[0]", "num_envs=2", "replan=5", f"execution={execution}",
                     "latency_ms=0", *FAST)
        evaluate(cfg, tmp_path / execution, policy=policy, make_env=helpers.make_logged_env)
        runs[execution] = ({log.actions[0][1]: [a for *_, a in log.actions] for log in helpers.LOGS},
                           {r["task_id"]: r for r in lines(tmp_path / execution)}, policy.calls)
    (acts_s, recs_s, calls_s), (acts_a, recs_a, calls_a) = runs["sync"], runs["async"]
    assert calls_s == calls_a
    for task in (0, 4):
        np.testing.assert_array_equal(np.array(acts_s[task]), np.array(acts_a[task]))
        same = ("success", "env_steps", "error", "held_steps", "action_jerk", "chunk_boundary_jump", "delay_steps")
        assert {k: recs_s[task][k] for k in same} == {k: recs_a[task][k] for k in same}


def test_execution_settings_are_checked_before_any_environment(tmp_path, monkeypatch):
    import runners.evaluate as ev

    monkeypatch.setattr(ev, "EnvPool", lambda *a, **k: pytest.fail("an environment was built"))
    with pytest.raises(ValueError, match="execution=sync freezes the simulator"):
        evaluate(config("latency_ms=100", *FAST), tmp_path)
    with pytest.raises(ValueError, match="unknown execution 'later'"):
        evaluate(config("execution=later", *FAST), tmp_path)
    with pytest.raises(ValueError, match="latency_ms must be a number of milliseconds or 'measured'"):
        evaluate(config("execution=async", "latency_ms=soon", *FAST), tmp_path)
    # values that used to run silently changed (replan 2.5 as 2), every episode an error (a NaN ensemble
    # weight) or crash with a bare OverflowError / int() message naming no setting
    for overrides, why in ((["replan=2.5"], "replan must be a whole number, got 2.5"),
                           (["replan=abc"], "replan must be a whole number, got 'abc'"),
                           (["chunking=ensemble", "ensemble_m=nan"], "ensemble_m must be a finite number"),
                           (["chunking=ensemble", "ensemble_m=abc"], "ensemble_m must be a finite number"),
                           (["execution=async", "latency_ms=1e308"], "latency_ms must be between 0 and 60000 ms")):
        with pytest.raises(ValueError, match=why):
            evaluate(config(*overrides, *FAST), tmp_path)
    with pytest.raises(ValueError, match=r"replan=5 \+ the latency's 6 steps exceeds the policy's chunk length 10"):
        evaluate(config("execution=async", "latency_ms=300", *FAST), tmp_path)
    with pytest.raises(ValueError, match="execution=rtc needs a policy"):
        evaluate(config("execution=rtc", "latency_ms=100", *FAST), tmp_path)
    with pytest.raises(ValueError, match="latency_ms=measured has no effect"):
        evaluate(config("latency_ms=measured", *FAST), tmp_path)
    with pytest.raises(ValueError, match=r"the latency is 10 env steps at 20 Hz, as long as the policy's whole chunk "
                                         r"of 10 actions.*latency_ms <= 250 with replan=5"):
        evaluate(config("execution=async", "latency_ms=500", *FAST), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["tasks=[0,3,0]"], r"tasks repeats \[0\]: each episode key must be asked for once"),
    (["init_states=[1,1]"], r"init_states repeats \[1\]"),
    (["seeds=[7,8,7]"], r"seeds repeats \[7\]"),
    (["tasks=[]"], "tasks is an empty list"),
    (["init_states=[]"], "init_states is an empty list"),
    (["seeds=[-1]"], r"seeds entry must be 0..4294967295, got -1"),
    (["seed=4294967296"], r"seed must be 0..4294967295"),
    (["episodes=2.5"], "episodes must be a whole number, got 2.5"),
    (["max_steps=0"], r"max_steps must be 1..100000, got 0"),
    (["max_steps=abc"], "max_steps must be a whole number, got 'abc'"),
    (["settle_steps=-1"], r"settle_steps must be 0..10000, got -1"),
    (["env.image_size=0"], r"env.image_size must be 16..2048, got 0"),
    (["env.camera_size=ten"], "env.camera_size must be a whole number"),
    (["video_fps=0"], r"video_fps must be 1..240, got 0"),
    (["video_stride=0"], r"video_stride must be >= 1, got 0"),
    (["vectorization=threads"], "unknown vectorization 'threads'"),
    (["reproduce=pi07_libero"], "reproduce=pi07_libero is not a published table; choose one of"),
])
def test_bad_settings_fail_before_anything_starts_or_is_written(tmp_path, monkeypatch, overrides, message):
    """Repeated or empty ids, out-of-range seeds, non-integer step counts, bad sizes: a clear error before
    any simulator starts and before the run directory is made."""
    import runners.evaluate as ev

    monkeypatch.setattr(ev, "EnvPool", lambda *a, **k: pytest.fail("an environment was built"))
    cfg = config(*[o for o in FAST if o.split("=")[0] not in {x.split("=")[0] for x in overrides}], *overrides)
    with pytest.raises(ValueError, match=message):
        evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_perturbations_reach_the_env_and_every_record(tmp_path, monkeypatch):
    cfg = config("tasks=[0]", "init_states=[0]", "policy=zero", "perturb=language", "perturb.severity=1.0", *FAST)
    summary = evaluate(cfg, tmp_path / "lang")
    (rec,) = lines(tmp_path / "lang")
    plain = evaluate(config("tasks=[0]", "init_states=[0]", "policy=zero", *FAST), tmp_path / "plain")
    (base,) = lines(tmp_path / "plain")
    assert rec["perturb"] == "language" and rec["severity"] == {"language": 1.0}
    assert base["perturb"] == "none" and base["severity"] == {}
    assert rec["task"] != base["task"]  # the prompt was rephrased
    assert summary["perturb"] == "language" and summary["config_hash"] != plain["config_hash"]
    import runners.evaluate as ev

    monkeypatch.setattr(ev, "EnvPool", lambda *a, **k: pytest.fail("an environment was built"))
    with pytest.raises(ValueError, match="no perturbation is selected"):
        evaluate(config("perturb.severity=0.5", *FAST), tmp_path / "bad")
    with pytest.raises(ValueError, match="severity"):
        evaluate(config("perturb=camera", "perturb.camera.severity=2", *FAST), tmp_path / "bad2")


def test_rtc_gets_the_previous_chunk_from_the_requests_own_step(tmp_path):
    """The chunk asked at step k continues the previous chunk's actions for steps k, k+1, ...: its
    frozen part (the latency's steps) and its overlap, aligned on the request's step."""
    policy = ChunkPolicy(chunk_size=8, supports_rtc=True)
    cfg = config("tasks=[0]", "init_states=[0]", "replan=3", "execution=rtc", "latency_ms=100", *FAST)
    evaluate(cfg, tmp_path, policy=policy, make_env=helpers.make_logged_env)
    first, second, third = policy.calls[:3]
    assert first["prev_overlap"].tolist() == [0] and not first["prev_actions"].any()  # nothing to continue yet
    # call 1 (at step 3) continues call 0's chunk (asked at step 0) from its index 3 on: 5 actions overlap
    assert second["steps"] == [3] and second["prev_overlap"].tolist() == [5] and second["prev_frozen"].tolist() == [2]
    expected = [ChunkPolicy.encode(0, j, 0) for j in range(3, 8)]
    assert [round(a, 6) for a in second["prev_actions"][0, :5, 0]] == expected
    assert [round(a, 6) for a in third["prev_actions"][0, :5, 0]] == [ChunkPolicy.encode(1, j, 0) for j in range(3, 8)]


class StopsOnCall(ChunkPolicy):
    """A policy that is interrupted (Ctrl-C) at its `n`-th call."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def infer(self, batch):
        if len(self.calls) + 1 >= self.n:
            raise KeyboardInterrupt
        return super().infer(batch)


def test_a_stopped_resume_leaves_a_summary_of_what_is_recorded_marked_incomplete(tmp_path):
    """A resume that adds episodes and is stopped used to leave the earlier summary.json, which review,
    reproduce and the sweep tables then reported as the run's."""
    out = tmp_path / "run"
    first = evaluate(config("tasks=[0]", "init_states=[0]", *FAST), out, policy=ChunkPolicy())
    assert first["complete"] is True and first["total"]["episodes"] == 1 and first["episodes_planned"] == 1
    with pytest.raises(KeyboardInterrupt):
        evaluate(config("tasks=[0]", "init_states=[0,1,2]", "num_envs=1", *FAST), out, policy=StopsOnCall(4))
    recorded = len(lines(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and summary["episodes_planned"] == 3
    assert summary["total"]["episodes"] + summary["total"]["errors"] == recorded >= 2  # what results.jsonl holds
    from runners.rundir import not_current

    assert not_current(out) == f"stopped after {recorded} of 3 episodes"
    done = evaluate(config("tasks=[0]", "init_states=[0,1,2]", *FAST), out, policy=ChunkPolicy())
    assert done["complete"] is True and done["total"]["episodes"] == 3 and not_current(out) is None
