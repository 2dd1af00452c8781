"""Known-harmless start-up noise of LIBERO and robosuite is silenced; everything else still shows."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CODE = """
import logging
from envs.libero import LiberoEnv
env = LiberoEnv(suite="libero_object", task_id=0, cameras=False)
env.close()
logging.getLogger("robosuite_logs").warning("a real robosuite warning")
from envs.quiet import quiet_libero_stdout
with quiet_libero_stdout():
    print("[info] Applying task order index 0 (permutation: [0, 1, 2]) for benchmark 'x' (3 tasks).")
    print("[info] Applying task order index 2 (permutation: [2, 0, 1]) for benchmark 'x' (3 tasks).")
    print("something LIBERO really says")
"""


def test_start_up_noise_is_silenced_and_real_messages_pass():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "No private macro file" not in text and "setup_macros.py" not in text
    assert "Applying task order index 0" not in text
    assert "a real robosuite warning" in text and "something LIBERO really says" in text
    assert "Applying task order index 2" in text  # a non-identity order matters: it is shown
