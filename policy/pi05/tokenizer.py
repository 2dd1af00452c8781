"""PaliGemma's SentencePiece tokenizer and the Pi0.5 prompt formats.

openpi: src/openpi/models/tokenizer.py PaligemmaTokenizer. Cleaning: strip, then "_" and "\\n" become
spaces (no lower-casing). Two formats:
  pi0 format (what `pi05_libero` uses, discrete_state_input=False):
      encode(cleaned, add_bos=True) + encode("\\n")         ("\\n" is the start-of-answer token)
  pi05 discrete-state format (discrete_state_input=True):
      encode("Task: {cleaned}, State: {d1 d2 ...};\\nAction: ", add_bos=True), with the normalized
      state discretized into 256 bins over [-1, 1]
Right-padded with id 0 to `max_len` with a mask; longer prompts are truncated with a warning.
The tokenizer file is the user's: openpi caches it at ~/.cache/openpi/big_vision/paligemma_tokenizer.model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TOKENIZER_HELP = (
    "The PaliGemma tokenizer is not downloaded by this project. openpi caches it at "
    "~/.cache/openpi/big_vision/paligemma_tokenizer.model (from gs://big_vision/paligemma_tokenizer.model, e.g. "
    "`gsutil cp gs://big_vision/paligemma_tokenizer.model ~/.cache/openpi/big_vision/`); pass tokenizer=PATH "
    "to use another location."
)


def default_tokenizer_path() -> Path:
    root = Path(os.environ.get("OPENPI_DATA_HOME", Path.home() / ".cache" / "openpi")).expanduser()
    return root / "big_vision" / "paligemma_tokenizer.model"


def clean(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalized state -> integers in -1..255 (256 bins over [-1, 1), as openpi's digitize)."""
    return np.digitize(np.asarray(state), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


class PaligemmaTokenizer:
    def __init__(self, path: str | os.PathLike | None = None, max_len: int = 200):
        import sentencepiece

        p = Path(path).expanduser() if path is not None else default_tokenizer_path()
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {p} not found. {TOKENIZER_HELP}")
        self.path = p
        self.max_len = int(max_len)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(p))

    def ids(self, prompt: str, state: np.ndarray | None = None) -> list[int]:
        text = clean(prompt)
        if state is None:
            return self._sp.encode(text, add_bos=True) + self._sp.encode("\n")
        digits = " ".join(str(int(d)) for d in discretize_state(state))
        return self._sp.encode(f"Task: {text}, State: {digits};\nAction: ", add_bos=True)

    def encode(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64 (max_len,), mask bool (max_len,))."""
        ids = self.ids(prompt, state)
        if len(ids) > self.max_len:
            log.warning("prompt of %d tokens truncated to %d: %r", len(ids), self.max_len, prompt[:80])
            ids = ids[: self.max_len]
        tokens = np.zeros(self.max_len, dtype=np.int64)
        mask = np.zeros(self.max_len, dtype=bool)
        tokens[: len(ids)] = ids
        mask[: len(ids)] = True
        return tokens, mask
