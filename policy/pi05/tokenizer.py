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
    from policy.pi05.checkpoints import openpi_data_home

    return openpi_data_home() / "big_vision" / "paligemma_tokenizer.model"


def clean(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalized state -> integers in -1..255 (256 bins over [-1, 1), as openpi's digitize)."""
    return np.digitize(np.asarray(state), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


# What the stand-in tokenizer is trained on: LIBERO's instruction vocabulary, so its prompts come out
# at about the real tokenizer's length (17-29 tokens against ~16-21: the same compile bucket).
_STAND_IN_TEXTS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the alphabet soup and place it in the basket", "open the middle drawer of the cabinet",
    "put both the alphabet soup and the tomato sauce in the basket", "turn on the stove",
    "put the wine bottle on top of the cabinet", "push the plate to the front of the stove",
    "Task: put the bowl on the plate, State: 12 128 255 0;\nAction: ", "stack the black bowls",
]


def stand_in_model_proto() -> bytes:
    """A small SentencePiece model (vocab 180; ids as Gemma's: pad 0, eos 1, bos 2) trained here on
    LIBERO-like instructions. Only for random weights, whose actions mean nothing anyway: it lets a
    speed test run without PaliGemma's file, which this project never downloads."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_STAND_IN_TEXTS * 20), model_writer=model, vocab_size=180,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, model_type="bpe",
                                   user_defined_symbols=["\n"], remove_extra_whitespaces=False,
                                   character_coverage=1.0, minloglevel=2)
    return model.getvalue()


class PaligemmaTokenizer:
    def __init__(self, path: str | os.PathLike | None = None, max_len: int = 200, model_proto: bytes | None = None):
        import sentencepiece

        self.max_len = int(max_len)
        if model_proto is not None:
            self.path = None
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
            return
        p = Path(path).expanduser() if path is not None else default_tokenizer_path()
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {p} not found. {TOKENIZER_HELP}")
        self.path = p
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(p))
        except (RuntimeError, OSError) as exc:  # sentencepiece names neither the file nor the way out
            raise ValueError(f"tokenizer file {p} is not a SentencePiece model ({str(exc).strip()[:200]}). "
                             f"{TOKENIZER_HELP}") from None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @classmethod
    def stand_in(cls, max_len: int = 200) -> "PaligemmaTokenizer":
        log.warning("no PaliGemma tokenizer file: using a generated stand-in tokenizer (random weights only; "
                    "prompts are tokenized differently from the real model)")
        return cls(max_len=max_len, model_proto=stand_in_model_proto())

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
