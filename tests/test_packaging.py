"""The package installs from a wheel, not only editable: configs and data files travel with it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_install_runs_the_evaluation_entry_point_with_its_configs(tmp_path):
    # Built from a clean copy: setuptools reuses a checkout's build/ folder, whose stale files would hide a
    # package missing from pyproject.toml's list.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "runs", ".e2e", ".cache",
                                                                 "*.egg-info", "__pycache__", "golden"))
    wheels = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("runners/conf/evaluate.yaml", "runners/conf/policy/pi05.yaml", "runners/conf/protocol/openpi.yaml",
                   "runners/conf/hydra/launcher/joblib.yaml", "policy/backends/calibration/agentview.png"):
        assert needed in names, f"{needed} is not in the wheel"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # Run from an empty directory with only the installed copy on the path ahead of the checkout.
    env = dict(os.environ, PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import runners; print(runners.__file__, runners.CONF_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert str(site) in where and str(REPO) not in where, where
    out = subprocess.run([sys.executable, "-m", "runners.evaluate", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "policy: pi05, random, remote, scripted, zero" in out.stdout and "protocol: openpi, smoke" in out.stdout
    job = subprocess.run([sys.executable, "-m", "runners.evaluate", "--cfg", "job", "policy=scripted", "suite=libero_object"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert "_target_: policy.scripted.ScriptedPolicy" in job.stdout and "suite: libero_object" in job.stdout
    # A real episode from the installed copy alone: the checkout's editable finder is taken out of the
    # import system, so a module the wheel lacks fails here instead of being found in the checkout.
    run = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
           "import runpy; runpy.run_module('runners.evaluate', run_name='__main__', alter_sys=True)")
    out = tmp_path / "run"
    ep = subprocess.run([sys.executable, "-c", run, "policy=zero", "tasks=[0]", "episodes=1", "max_steps=3",
                         "vectorization=sync", "videos=none", "perturb=language", "perturb.severity=1.0",
                         "env.camera_size=64", "env.image_size=64", f"out={out}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ep.returncode == 0, ep.stderr[-3000:]
    assert '"perturb": "language"' in (out / "results.jsonl").read_text()


def test_every_package_of_the_source_tree_is_in_the_wheel_list():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(REPO)).replace("/", ".") for top in ("envs", "policy", "runners", "videos")
             for p in (REPO / top).rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml's list: {sorted(found - listed)}"
