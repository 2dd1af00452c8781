"""A progress bar with ETA and the running success rate."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, done: list[dict[str, Any]]):
        self.successes = sum(bool(r["success"]) for r in done if not r.get("error"))
        self.finished = sum(1 for r in done if not r.get("error"))
        self.errors = sum(1 for r in done if r.get("error"))
        self.bar = tqdm(total=total, initial=len(done), unit="ep", dynamic_ncols=True, file=sys.stderr,
                        desc="episodes", smoothing=0.05)
        self._postfix()

    def _postfix(self) -> None:
        rate = f"{100 * self.successes / self.finished:.1f}%" if self.finished else "-"
        self.bar.set_postfix_str(f"success {rate} ({self.successes}/{self.finished}), errors {self.errors}")

    def update(self, rec: dict[str, Any]) -> None:
        if rec.get("error"):
            self.errors += 1
        else:
            self.finished += 1
            self.successes += bool(rec["success"])
        self._postfix()
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
