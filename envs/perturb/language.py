"""Language perturbation: synonym swaps, a paraphrase frame and distractor clauses in the prompt.

Severity s maps to (each operation can be left out with `ops`):

    synonym     every phrase of the instruction that has synonyms (language.yaml) is swapped for one of
                them with probability s ("pick up" -> "grab", "cabinet" -> "cupboard")
    paraphrase  with probability s the instruction is put in a frame ("could you {}", "{}, please")
    distractor  each of `max_distractors` (default 2) irrelevant clauses is appended with probability s
                ("... the weather is nice today")

So at s = 1 every swappable phrase is swapped, the instruction is framed and 2 clauses are added; at
s = 0.5 half of that on average. Only `info["task"]` (the prompt the runner sends the policy) changes,
at reset and on every step; the observations, physics and `env.unwrapped.task` do not. The edit is fixed
per episode and drawn from the episode's generator (seed, task, init state); the word lists are the
shipped language.yaml unless `vocabulary` names another file of the same shape.

References: LIBERO-PRO (arXiv:2510.03827) perturbs instructions the same three ways in its `_lan` suites.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from envs.perturb.base import Perturbation, episode_rng

OPS = ("synonym", "paraphrase", "distractor")
VOCABULARY = Path(__file__).with_name("language.yaml")


@lru_cache(maxsize=4)
def load_vocabulary(path: str | Path = VOCABULARY) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"language: word list {path} not found; pass vocabulary=<a yaml file> shaped like "
                                f"{VOCABULARY}")
    data = yaml.safe_load(path.read_text())
    missing = [k for k in ("synonyms", "paraphrases", "distractors") if not data.get(k)]
    if missing:
        raise ValueError(f"language: {path} lacks {missing} (see {VOCABULARY} for the shape)")
    if any("{}" not in p for p in data["paraphrases"]):
        raise ValueError(f"language: every paraphrase in {path} must contain {{}} where the instruction goes")
    return data


def perturb_text(text: str, severity: float, rng: np.random.Generator, vocabulary: dict, ops=OPS,
                 max_distractors: int = 2) -> str:
    """The instruction, perturbed. Draws the same numbers from `rng` whatever the severity."""
    out = text
    if "synonym" in ops:
        phrases = sorted(vocabulary["synonyms"], key=lambda p: -len(p.split()))
        words, kept, i = text.split(" "), [], 0
        while i < len(words):
            for phrase in phrases:
                n = len(phrase.split())
                if [w.lower() for w in words[i:i + n]] == phrase.split():
                    choices = vocabulary["synonyms"][phrase]
                    u, pick = rng.random(), int(rng.integers(len(choices)))
                    kept.append(choices[pick] if u < severity else " ".join(words[i:i + n]))
                    i += n
                    break
            else:
                kept.append(words[i])
                i += 1
        out = " ".join(kept)
    if "paraphrase" in ops:
        u, pick = rng.random(), int(rng.integers(len(vocabulary["paraphrases"])))
        if u < severity:
            out = vocabulary["paraphrases"][pick].format(out)
    if "distractor" in ops:
        pool = vocabulary["distractors"]
        order = rng.permutation(len(pool))[:max_distractors]  # distinct clauses
        us = rng.random(len(order))
        out = ". ".join([out] + [pool[j] for j, u in zip(order, us) if u < severity])
    return out


class Language(Perturbation):
    name = "language"

    def __init__(self, env, severity: float = 0.0, ops=OPS, max_distractors: int = 2, vocabulary=None):
        self.ops = tuple(ops)
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops:
            raise ValueError(f"language: ops must be a non-empty subset of {list(OPS)}, got {list(ops)}")
        if int(max_distractors) < 0:
            raise ValueError(f"language: max_distractors must be >= 0, got {max_distractors}")
        self.max_distractors = int(max_distractors)
        self.vocabulary = load_vocabulary(vocabulary or VOCABULARY)
        super().__init__(env, severity)
        self._prompt: str | None = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._prompt = None
        self.applied = {}
        if self.severity > 0:
            rng = episode_rng(self.libero, self.name)
            self._prompt = perturb_text(info["task"], self.severity, rng, self.vocabulary, self.ops,
                                        self.max_distractors)
            self.applied = {"original": info["task"], "prompt": self._prompt}
        return obs, self._edit(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._edit(info)

    def _edit(self, info):
        if self._prompt is None:
            return info
        return {**info, "task": self._prompt}
