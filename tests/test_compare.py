"""Paired comparisons: the statistics against published examples, the pairing of episodes and of a
sweep's jobs (fast: no simulator; the CLI on real run directories is in tests/test_triage.py)."""

import json

import pytest
from scipy import stats

from runners.compare import compare_records, markdown_table, setting_differences, sweep_comparisons
from runners.stats import PAIRED_CI_METHOD, mcnemar_exact, paired_difference_ci


# ----- statistics ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("table, lo, hi", [
    # Newcombe (1998), Stat Med 17:2635, the paper's illustrative examples, method 10 (e, f, g, h)
    ((36, 12, 2, 0), 0.0569, 0.3404),
    ((20, 12, 2, 16), 0.0562, 0.3292),
    ((27, 0, 0, 27), -0.0351, 0.0351),
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8: Cavo et al.
    # 2012, complete response before/after consolidation: Newcombe square-and-add -0.0621 (-0.1186, -0.0046)
    ((59, 6, 16, 80), -0.1186, -0.0046),
])
def test_newcombe_paired_interval_matches_published_examples(table, lo, hi):
    d, a, b = paired_difference_ci(*table)
    n11, n12, n21, n22 = table
    assert d == pytest.approx((n12 - n21) / sum(table))
    assert a == pytest.approx(lo, abs=6e-5) and b == pytest.approx(hi, abs=6e-5)


def test_newcombe_interval_is_antisymmetric_and_bounded():
    d, lo, hi = paired_difference_ci(10, 7, 2, 5)
    d2, lo2, hi2 = paired_difference_ci(10, 2, 7, 5)  # the two classifications swapped
    assert (d2, lo2, hi2) == pytest.approx((-d, -hi, -lo))
    _, lo, hi = paired_difference_ci(0, 12, 0, 0)  # every pair: only the first succeeded
    assert -1.0 <= lo < hi <= 1.0 and hi == pytest.approx(1.0)
    assert paired_difference_ci(0, 0, 0, 0) is None


def test_exact_mcnemar_against_textbook_examples():
    # Altman et al., Statistics with Confidence (2000), table 6.2 (14, 5, 0, 22): all 5 discordant pairs
    # one way, so the exact two-sided p is 2 * 0.5**5
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    # Agresti, Categorical Data Analysis (3rd ed., 11.1): presidential approval 794, 150, 86, 570;
    # McNemar's z^2 = (150 - 86)^2 / 236 = 17.36, p < 0.001. The exact test agrees with it here.
    p = mcnemar_exact(150, 86)
    assert (150 - 86) ** 2 / 236 == pytest.approx(17.36, abs=0.005)
    assert p < 0.001 and p == pytest.approx(stats.chi2.sf(17.36, 1), rel=0.3)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(4, 4) == 1.0
    # the definition: two-sided binomial test of b successes in b + c trials at 1/2
    assert mcnemar_exact(3, 11) == pytest.approx(stats.binomtest(3, 14, 0.5).pvalue)
    assert mcnemar_exact(3, 11) == pytest.approx(2 * stats.binom.cdf(3, 14, 0.5))


# ----- pairing episodes ----------------------------------------------------------------------------------

def rec(task, k, success, error="", seed=7):
    return {"suite": "libero_spatial", "task_id": task, "task": f"task {task}", "init_state_id": k, "seed": seed,
            "success": success, "env_steps": 10, "error": error}


def keyed(*recs):
    return {(r["suite"], r["task_id"], r["init_state_id"], r["seed"]): r for r in recs}


def test_episodes_pair_by_key_errors_left_out_of_both_sides():
    a = keyed(rec(0, 0, True), rec(0, 1, True), rec(0, 2, False), rec(0, 3, False), rec(0, 4, True, error="boom"),
              rec(0, 5, True), rec(1, 0, True))
    b = keyed(rec(0, 0, True), rec(0, 1, False), rec(0, 2, True), rec(0, 3, False), rec(0, 4, False),
              rec(0, 5, False, error="boom"), rec(0, 6, True))
    c = compare_records(a, b)
    # paired: init states 0-3 (4 and 5 errored on one side; (1, 0) only in A; (0, 6) only in B)
    assert c["paired"] == 4 and (c["both"], c["a_only"], c["b_only"], c["neither"]) == (1, 1, 1, 1)
    assert (c["unpaired_a"], c["unpaired_b"], c["errors_a"], c["errors_b"]) == (2, 2, 1, 1)
    assert c["a_success_rate"] == c["b_success_rate"] == 0.5 and c["difference"] == 0.0
    assert c["mcnemar_p"] == 1.0 and c["method"] == PAIRED_CI_METHOD
    assert [(d["init_state_id"], d["success"]) for d in c["discordant"]] == [(1, "a"), (2, "b")]
    none = compare_records(a, {})
    assert none["paired"] == 0 and none["difference"] is None and none["mcnemar_p"] is None


def summary(steps=10, replan=5, **extra):
    cfg = {"suite": "libero_spatial", "steps": steps, "replan": replan, "backend": "eager", "max_steps": 40,
           "num_envs": 1, "out": "x", "policy": {"_target_": "policy.simple.ZeroPolicy", "device": "cpu"},
           "env": {"max_steps": 40, "cameras": True}}
    for k, v in extra.items():
        if k == "policy":
            cfg["policy"] = v
        elif k == "env":
            cfg["env"] = {**cfg["env"], **v}
        else:
            cfg[k] = v
    return {"config": cfg, "policy_name": cfg["policy"]["_target_"].rsplit(".", 1)[-1]}


def test_settings_that_do_not_decide_results_and_mirrored_settings_are_not_differences():
    assert setting_differences(summary(), summary(num_envs=8, out="y", tasks=[0])) == {}
    assert setting_differences(summary(), summary(policy={"_target_": "policy.simple.ZeroPolicy", "device": "cuda"})) == {}
    # max_steps is mirrored into env.max_steps by the config: one setting
    assert setting_differences(summary(), summary(max_steps=80, env={"max_steps": 80})) == {"max_steps": (40, 80)}
    # ... unless env.max_steps was set on its own
    assert setting_differences(summary(), summary(env={"max_steps": 80})) == {"env.max_steps": (40, 80)}
    # another policy class is one setting, however many of its keys differ
    other = summary(policy={"_target_": "policy.scripted.ScriptedPolicy", "chunk_size": 10, "action_noise": 0.0})
    assert setting_differences(summary(), other) == {"policy": ("ZeroPolicy", "ScriptedPolicy")}
    assert setting_differences(summary(steps=1, replan=2), summary(steps=3, replan=3)) == {"steps": (1, 3), "replan": (2, 3)}
    # a shared perturbation severity is the kind's severity: one setting, said two ways
    light = {"name": "lighting", "severity": 0.5}
    shared = summary(perturb={"lighting": light, "severity": 1.0})
    assert setting_differences(shared, summary(perturb={"lighting": {**light, "severity": 1.0}, "severity": None})) == {}
    assert setting_differences(shared, summary(perturb={"lighting": light, "severity": 0.5})) == {
        "perturb.lighting.severity": (1.0, 0.5)}


def write_job(root, name, summ, outcomes):
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summ))
    lines = [rec(0, k, s) for k, s in enumerate(outcomes)]
    (d / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_a_2x2_sweep_pairs_jobs_that_differ_in_one_setting(tmp_path):
    root = tmp_path / "sweep"
    write_job(root, "job0_replan=2,steps=1", summary(steps=1, replan=2), [True, True, False, False])
    write_job(root, "job1_replan=5,steps=1", summary(steps=1, replan=5), [True, False, False, False])
    write_job(root, "job2_replan=2,steps=3", summary(steps=3, replan=2), [True, True, True, True])
    write_job(root, "job3_replan=5,steps=3", summary(steps=3, replan=5), [False, True, True, True])
    write_job(root, "job10_replan=5,steps=3", summary(steps=3, replan=5, num_envs=4), [True] * 4)  # a re-run
    comps = sweep_comparisons(root)
    found = sorted((c["setting"], c["a"].split("_")[0], c["b"].split("_")[0]) for c in comps)
    assert found == [("replan", "job0", "job1"), ("replan", "job2", "job10"), ("replan", "job2", "job3"),
                     ("steps", "job0", "job2"), ("steps", "job1", "job10"), ("steps", "job1", "job3")]
    # the diagonal (both settings differ) and job3 vs job10 (only num_envs differs) are not pairs
    c = next(c for c in comps if c["a"].startswith("job1_") and c["b"].startswith("job3_"))
    assert (c["a_value"], c["b_value"]) == (1, 3) and (c["a_only"], c["b_only"]) == (1, 3)
    assert c["difference"] == pytest.approx(0.5) and c["mcnemar_p"] == pytest.approx(0.625)  # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    md = markdown_table(comps)
    assert md.count("\n| steps: 1 → 3 |") == 3 and "Newcombe 1998 method 10" in md and "McNemar" in md


def test_jobs_that_share_no_episode_are_not_compared(tmp_path):
    """steps=1 on task 0 and steps=3 on task 1 differ in one setting but have no episode in common."""
    root = tmp_path / "sweep"
    write_job(root, "job0_steps=1", summary(steps=1), [True, False])
    other = root / "job1_steps=3"
    other.mkdir(parents=True)
    (other / "summary.json").write_text(json.dumps(summary(steps=3)))
    (other / "results.jsonl").write_text("".join(json.dumps(rec(1, k, True)) + "\n" for k in range(2)))
    assert sweep_comparisons(root) == []
    write_job(root, "job2_steps=3", summary(steps=3), [True, True])  # the same episodes as job0: compared
    assert [(c["a"], c["b"], c["paired"]) for c in sweep_comparisons(root)] == [("job0_steps=1", "job2_steps=3", 2)]
