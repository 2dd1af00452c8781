"""A policy served elsewhere over openpi's websocket protocol (our runners.serve, or openpi's own).

Each observation of a batch goes out on its own connection, concurrently, so a batching server sees
them together; the replies are stacked back into one (B, chunk, 7) array. Connections are opened as
the batch size first needs them and kept.

The protocol is openpi-client's (openpi_client/websocket_client_policy.py, `WebsocketClientPolicy`):
the server sends its metadata first; then msgpack-numpy dicts go both ways and a text reply is an
error; `api_key` is sent as `Authorization: Api-Key <key>`. We speak it with websockets directly
rather than through `WebsocketClientPolicy` because that one waits forever: no connect timeout, no
reply timeout. Here `timeout_s` bounds each row's request (connecting, when it has to, included): a
row that runs out of time is an error row (NaN actions, an `errors` entry), its connection is dropped
and reopened on the next call, and the run goes on.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import socket
import threading
import time
from typing import Any

import numpy as np
from openpi_client import msgpack_numpy
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from policy import wire
from policy.base import batch_size

# websockets 17 warns when connect() is used outside a `with`; legacy=True keeps the plain call quiet
# (older versions have no such flag and no warning).
_CONNECT_KW = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


def _plain(x: Any) -> Any:
    """Metadata as JSON-able values (numpy arrays and scalars become lists and numbers)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def to_openpi_observation(batch: dict[str, Any], i: int, episode_step: bool = False) -> dict[str, Any]:
    """Row i of our batch as openpi's LIBERO observation dict (examples/libero/main.py); with
    `episode_step` (servers that advertise it: runners/server.py EXTENSION) also the row's episode
    and step, so a server seeding noise per episode answers as the in-process policy would."""
    obs = {
        "observation/image": np.asarray(batch["image"][i]),
        "observation/wrist_image": np.asarray(batch["wrist_image"][i]),
        "observation/state": np.asarray(batch["state"][i]),
        "prompt": batch["prompt"][i],
    }
    if episode_step and "episode" in batch and "step" in batch:
        obs["harness/episode"] = [x if isinstance(x, str) else int(x) for x in batch["episode"][i]]
        obs["harness/step"] = int(batch["step"][i])
    return obs


class ServerRefused(ConnectionError):
    """The server answered the handshake with an HTTP error (401: the API key)."""


class _Connection:
    """One connection speaking openpi's protocol, every wait bounded by a deadline."""

    def __init__(self, uri: str, api_key: str | None, deadline: float):
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            self.ws: ClientConnection = connect(uri, compression=None, max_size=None, additional_headers=headers,
                                                open_timeout=_left(deadline), close_timeout=1.0, **_CONNECT_KW)
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = (" (wrong or missing API key: set policy.api_key= to the server's key)" if status == 401 else "")
            raise ServerRefused(f"{uri} refused the connection: HTTP {status}{hint}") from None
        self.socket = self.ws.socket
        try:
            self.metadata = self._reply(deadline)
        except BaseException:
            self.abort()
            raise

    def _reply(self, deadline: float) -> Any:
        message = self.ws.recv(timeout=_left(deadline))
        if isinstance(message, str):  # openpi's protocol: a text reply is the server's error message
            raise RuntimeError(f"Error in inference server:\n{message}")
        return wire.unpackb(message)  # our checked decoder: a hostile server cannot crash the client either

    def infer(self, obs: dict[str, Any], deadline: float) -> dict[str, Any]:
        try:
            self.ws.send(msgpack_numpy.packb(obs))
            reply = self._reply(deadline)
        except ConnectionClosed as exc:  # the server may refuse a big message while it is still being sent
            too_big = [c for c in (exc.rcvd, exc.sent) if c is not None and c.code == CloseCode.MESSAGE_TOO_BIG]
            if too_big:
                raise RuntimeError(f"the server refused the observation as too big ({too_big[0].reason}); send "
                                   f"smaller images or raise the server's max_message_mb") from None
            raise
        if not isinstance(reply, dict) or "actions" not in reply:
            raise RuntimeError(f"the server replied with {type(reply).__name__} without 'actions'")
        return reply

    def abort(self) -> None:
        """Drop the connection now: unblocks a send or recv in another thread, and waits for nobody."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed
        try:
            self.ws.close()  # the socket is shut: returns at once (close_timeout bounds it otherwise)
        except Exception:
            pass


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class RemotePolicy:
    needs_privileged = False

    def __init__(self, host: str = "localhost", port: int = 8000, api_key: str | None = None, timeout_s: float = 60.0):
        if not float(timeout_s) > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.host, self.port, self.api_key, self.timeout_s = host, int(port), api_key, float(timeout_s)
        # as WebsocketClientPolicy builds it, except that a host named "ws..." is not taken for a URI
        self.uri = f"{host if host.startswith(('ws://', 'wss://')) else 'ws://' + host}:{self.port}"
        self._clients: list[_Connection | None] = []
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="remote")
        try:
            first = self._connect(time.monotonic() + self.timeout_s)  # fail now, before any simulator starts
        except ServerRefused:
            raise
        except (OSError, ConnectionClosed, InvalidHandshake, InvalidURI) as exc:  # refused, unreachable, timed out
            raise ConnectionError(f"no policy server at {self.uri} ({type(exc).__name__}: {exc}); start one "
                                  f"with `python -m runners.serve ...` or point host=/port= at yours") from None
        self._clients.append(first)
        self.metadata = first.metadata if isinstance(first.metadata, dict) else {}
        chunk = self.metadata.get("chunk_size")
        self.chunk_size = chunk if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1 else None
        # What the server says it runs (our runners.serve sends `identity`: checkpoint, steps, backend);
        # a server that says nothing (or something else than a dict) is identified by its whole metadata.
        identity = self.metadata.get("identity")
        self.identity = identity if isinstance(identity, dict) and identity else {"server_metadata": _plain(self.metadata)}
        extensions = self.metadata.get("extensions")
        self.extensions = {e for e in extensions if isinstance(e, str)} if isinstance(extensions, (list, tuple)) else set()
        self.num_steps = self.identity.get("num_steps", self.metadata.get("steps"))
        self.backend = self.identity.get("backend", self.metadata.get("backend"))

    def _connect(self, deadline: float) -> _Connection:
        return _Connection(self.uri, self.api_key, deadline)

    def _client(self, i: int, deadline: float) -> _Connection:
        with self._lock:
            while len(self._clients) <= i:
                self._clients.append(None)
            conn = self._clients[i]
        if conn is None:  # connect outside the lock: other rows need not wait for this one
            conn = self._connect(deadline)
            with self._lock:
                self._clients[i] = conn
        return conn

    def _drop(self, i: int, conn: _Connection | None) -> None:
        with self._lock:  # only the connection this row used: a newer one may already be in its place
            if conn is not None and i < len(self._clients) and self._clients[i] is conn:
                self._clients[i] = None
        if conn is not None:
            conn.abort()

    def _one(self, i: int, obs: dict[str, Any], deadline: float, used: dict):
        conn = None
        try:
            conn = used[i] = self._client(i, deadline)
            reply = conn.infer(obs, deadline)
            if isinstance(reply.get("error"), str):  # the server's policy failed this row (runners/server.py)
                return None, RuntimeError(f"the server's policy: {reply['error']}")
            return np.asarray(reply["actions"]), None
        except Exception as exc:  # this row failed (error reply, lost connection, timeout): reconnect next time
            self._drop(i, conn)
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no reply from {self.uri} within timeout_s={self.timeout_s:g} s; the "
                                   f"connection was dropped and is reopened on the next call")
            return None, exc

    def infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One request per row, concurrently, each within `timeout_s`. A row whose request failed comes
        back as NaN actions, so only its episode is marked as an error; if every row failed, the first
        error is raised."""
        n = batch_size(batch)
        deadline = time.monotonic() + self.timeout_s
        used: dict[int, _Connection] = {}
        ext = "episode_step" in self.extensions
        futures = [self._pool.submit(self._one, i, to_openpi_observation(batch, i, ext), deadline, used)
                   for i in range(n)]
        # recv and connect honour the deadline themselves; a send to a server that stopped reading
        # does not, so past the deadline (and a second's grace) such rows are cut loose here.
        concurrent.futures.wait(futures, timeout=_left(deadline) + 1.0)
        results = []
        for i, f in enumerate(futures):
            if f.done():
                results.append(f.result())
            else:
                self._drop(i, used.get(i))  # unblocks the stuck send; that thread then ends on its own
                results.append((None, TimeoutError(f"no reply from {self.uri} within timeout_s={self.timeout_s:g} s "
                                                   f"(still connecting or sending)")))
        good = [a for a, _ in results if a is not None]
        if not good:
            raise results[0][1]
        shape = good[0].shape
        for i, (a, _) in enumerate(results):  # a server must not answer rows of one batch in different shapes
            if a is not None and a.shape != shape:
                results[i] = (None, RuntimeError(f"the server replied with actions of shape {a.shape}, another "
                                                 f"row of the batch with {shape}"))
        return {"actions": np.stack([a if a is not None else np.full(shape, np.nan) for a, _ in results]),
                "errors": [None if e is None else f"{type(e).__name__}: {e}" for _, e in results]}

    def reset(self) -> None:
        pass
