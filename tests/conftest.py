"""Shared test fixtures. Real LIBERO environments are expensive on a CPU (seconds to build, ~0.25 s a
step), so tests share them per module where they can."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    # No GPU (CI): Triton kernels run in Triton's interpreter, which must be chosen before triton is imported.
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Tensors made by openpi's own model (see golden/pi05/README.md); a copy of the team's shared/golden.
GOLDEN = Path(os.environ.get("PI05_GOLDEN_DIR", REPO / "tests" / "golden" / "pi05"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "tiny_case.safetensors").is_file():
        raise FileNotFoundError(
            f"golden Pi0.5 tensors not found at {GOLDEN}; set PI05_GOLDEN_DIR to the folder holding "
            "tiny_case.safetensors"
        )
    return GOLDEN


@pytest.fixture(scope="session")
def golden_case(golden_dir) -> dict:
    """openpi's tensors for the tiny model: `input.*` (a batch of 2), `output.*` (fp32 results), `extra.*`."""
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "tiny_case.safetensors"))


@pytest.fixture(scope="session")
def golden_inputs(golden_case) -> tuple:
    """The golden batch as every sampler takes it: (images, image_masks, tokens, token_masks, noise), CPU."""
    from policy.pi05.config import CAMERA_SLOTS

    c = golden_case
    return ([c[f"input.image.{s}"] for s in CAMERA_SLOTS], [c[f"input.image_mask.{s}"] for s in CAMERA_SLOTS],
            c["input.tokenized_prompt"], c["input.tokenized_prompt_mask"], c["input.noise"])


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory) -> Path:
    """The generated stand-in tokenizer (policy/pi05/tokenizer.py; ids like Gemma's: pad 0, eos 1, bos 2) as a
    file, standing in for PaliGemma's tokenizer, which tests may not download."""
    from policy.pi05.tokenizer import stand_in_model_proto

    path = tmp_path_factory.mktemp("tokenizer") / "paligemma_tokenizer.model"
    path.write_bytes(stand_in_model_proto())
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(golden_dir, tmp_path_factory) -> Path:
    """An openpi-style PyTorch checkpoint directory of the golden tiny model (weights + norm stats)."""
    import shutil

    d = tmp_path_factory.mktemp("ckpt") / "pi05_tiny"
    d.mkdir()
    shutil.copy(golden_dir / "tiny_openpi_model.safetensors", d / "model.safetensors")
    shutil.copytree(golden_dir / "tiny_openpi_jax" / "assets", d / "assets")
    return d
