"""A policy served elsewhere over openpi's websocket protocol (our runners.serve, or openpi's own).

Each observation of a batch goes out on its own connection (openpi's `WebsocketClientPolicy`),
concurrently, so a batching server sees them together; the replies are stacked back into one
(B, chunk, 7) array. Connections are opened as the batch size first needs them and kept.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import numpy as np

from policy.base import batch_size


def to_openpi_observation(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """Row i of our batch as openpi's LIBERO observation dict (examples/libero/main.py)."""
    return {
        "observation/image": np.asarray(batch["image"][i]),
        "observation/wrist_image": np.asarray(batch["wrist_image"][i]),
        "observation/state": np.asarray(batch["state"][i]),
        "prompt": batch["prompt"][i],
    }


class RemotePolicy:
    needs_privileged = False

    def __init__(self, host: str = "localhost", port: int = 8000, api_key: str | None = None, timeout_s: float = 60.0):
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        self.host, self.port, self.api_key = host, int(port), api_key
        self._client_cls = WebsocketClientPolicy
        self._clients: list = []
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="remote")
        try:
            first = self._connect()  # fail now (before any simulator starts) if nothing listens
        except OSError as exc:
            raise ConnectionError(f"no policy server at ws://{host}:{port} ({exc}); start one with "
                                  f"`python -m runners.serve ...` or point host=/port= at yours") from None
        self._clients.append(first)
        self.metadata = first.get_server_metadata()
        self.chunk_size = self.metadata.get("chunk_size") if isinstance(self.metadata, dict) else None

    def _connect(self):
        return self._client_cls(self.host, self.port, api_key=self.api_key)

    def _one(self, i: int, obs: dict[str, Any]):
        try:
            return np.asarray(self._client(i).infer(obs)["actions"]), None
        except Exception as exc:  # this row failed (server error reply, lost connection): reconnect next time
            with self._lock:
                self._clients[i] = None
            return None, exc

    def _client(self, i: int):
        with self._lock:
            while len(self._clients) <= i:
                self._clients.append(None)
            if self._clients[i] is None:
                self._clients[i] = self._connect()
            return self._clients[i]

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One request per row, concurrently. A row whose request failed comes back as NaN actions, so
        only its episode is marked as an error; if every row failed, the first error is raised."""
        n = batch_size(batch)
        results = list(self._pool.map(lambda i: self._one(i, to_openpi_observation(batch, i)), range(n)))
        good = [a for a, _ in results if a is not None]
        if not good:
            raise results[0][1]
        shape = good[0].shape
        return {"actions": np.stack([a if a is not None else np.full(shape, np.nan) for a, _ in results]),
                "errors": [None if e is None else f"{type(e).__name__}: {e}" for _, e in results]}

    def reset(self) -> None:
        pass
