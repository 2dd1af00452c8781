"""Shared test fixtures. Real LIBERO environments are expensive on a CPU (seconds to build, ~0.25 s a
step), so tests share them per module where they can."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("PI05_GOLDEN_DIR", REPO.parent / "shared" / "golden" / "pi05"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "tiny_case.safetensors").is_file():
        raise FileNotFoundError(
            f"golden Pi0.5 tensors not found at {GOLDEN}; set PI05_GOLDEN_DIR to the folder holding "
            "tiny_case.safetensors"
        )
    return GOLDEN
