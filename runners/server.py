"""A policy server speaking openpi's websocket protocol, batching requests across clients.

Protocol (as `openpi-client` 0.1.2 implements it, openpi_client/websocket_client_policy.py):
on connect the server sends its metadata (a msgpack-numpy dict); then each binary message from the
client is one observation dict ({"observation/image", "observation/wrist_image",
"observation/state", "prompt"} for LIBERO) and the server answers with a msgpack-numpy dict
{"actions": (chunk, 7), "policy_timing": {"infer_ms"}, "server_timing": {"infer_ms", "prev_total_ms"}}.
A text message is an error (the client raises it). GET /healthz answers "OK" over plain HTTP.

Batching: observations from different connections that arrive together are run as one policy call
(at most `max_batch`). After the first request the batch waits up to `window_ms` for more, but
closes as soon as every connected client already has a request in it, so a lone client waits for
nothing. Policy calls run in one worker thread; the event loop keeps receiving meanwhile, so under
load the next batch fills while the current one runs.

Robustness: a malformed or wrong-shaped message gets an error reply and that connection is closed
(the server goes on); a client that disconnects mid-request is skipped; SIGTERM stops accepting
connections, finishes the requests already received, answers them, and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
from openpi_client import msgpack_numpy
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from openpi_client.image_tools import resize_with_pad
from policy.base import check_actions

log = logging.getLogger(__name__)

IMAGE_KEYS = {"observation/image": "image", "observation/wrist_image": "wrist_image"}


class BadRequest(ValueError):
    pass


def _image(value: Any, key: str, size: int) -> np.ndarray:
    img = np.asarray(value)
    if img.ndim != 3:
        raise BadRequest(f"{key} must be an image (H, W, 3), got shape {img.shape}")
    if img.shape[0] == 3 and img.shape[-1] != 3:  # CHW, as openpi accepts
        img = img.transpose(1, 2, 0)
    if img.shape[-1] != 3:
        raise BadRequest(f"{key} must have 3 channels, got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating):  # openpi: float images in [0, 1] become uint8
        img = (255 * img).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise BadRequest(f"{key} must be uint8 or float, got {img.dtype}")
    return resize_with_pad(img, size, size)


def parse_observation(obs: Any, image_size: int = 224) -> dict[str, Any]:
    """openpi's LIBERO observation dict -> one row of our batch format (see policy/base.py)."""
    if not isinstance(obs, dict):
        raise BadRequest(f"expected an observation dict, got {type(obs).__name__}")
    missing = [k for k in (*IMAGE_KEYS, "observation/state", "prompt") if k not in obs]
    if missing:
        raise BadRequest(f"observation is missing {missing}; expected keys {[*IMAGE_KEYS, 'observation/state', 'prompt']}")
    row = {ours: _image(obs[k], k, image_size) for k, ours in IMAGE_KEYS.items()}
    state = np.asarray(obs["observation/state"], dtype=np.float32)
    if state.shape != (8,) or not np.all(np.isfinite(state)):
        raise BadRequest(f"observation/state must be 8 finite numbers (LIBERO's state), got shape {state.shape}")
    row["state"] = state
    prompt = obs["prompt"]
    if isinstance(prompt, bytes):
        prompt = prompt.decode()
    if not isinstance(prompt, str):
        raise BadRequest(f"prompt must be a string, got {type(prompt).__name__}")
    row["prompt"] = prompt
    return row


@dataclass
class _Request:
    row: dict[str, Any]
    client: int
    received: float = field(default_factory=time.perf_counter)
    result: asyncio.Future | None = None


class PolicyServer:
    def __init__(self, policy, host: str = "0.0.0.0", port: int = 8000, max_batch: int = 16,
                 window_ms: float = 5.0, metadata: dict[str, Any] | None = None, image_size: int = 224):
        self.policy, self.host, self.port = policy, host, int(port)
        self.max_batch, self.window = int(max_batch), float(window_ms) / 1000.0
        self.image_size = image_size
        self.metadata = {
            "server": "pi05-harness",
            "chunk_size": getattr(policy, "chunk_size", None),
            "action_dim": 7,
            "max_batch": self.max_batch,
            **(metadata or {}),
        }
        # Recent policy calls' batch sizes, and why each batch stopped waiting (everyone-in, window,
        # full): for logs and tests; bounded so a server running for weeks does not grow.
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._clients: set[int] = set()
        self._inflight = 0  # requests received and not yet answered
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started = threading.Event()  # set once the port is open (self.port is then the real one)
        self.close_reasons: deque[str] = deque(maxlen=10_000)

    # ----- connections ------------------------------------------------------------------------------
    @staticmethod
    def _health(connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        cid = id(ws)
        self._clients.add(cid)
        prev_total_ms = None
        try:
            await ws.send(msgpack_numpy.packb(self.metadata))
            async for message in ws:
                t0 = time.perf_counter()
                try:
                    if isinstance(message, str):
                        raise BadRequest("expected a binary msgpack message, got text")
                    row = parse_observation(msgpack_numpy.unpackb(message), self.image_size)
                except BadRequest as exc:
                    await self._refuse(ws, f"bad request: {exc}")
                    return
                except Exception as exc:  # undecodable bytes
                    await self._refuse(ws, f"bad request: could not decode the message ({type(exc).__name__}: {exc})")
                    return
                req = _Request(row, cid, t0, asyncio.get_running_loop().create_future())
                self._inflight += 1
                try:
                    await self._queue.put(req)
                    try:
                        out = await req.result
                    except Exception as exc:
                        await self._refuse(ws, f"policy error: {exc}", code=1011)
                        return
                    out["server_timing"] = {"infer_ms": out.pop("_batch_ms"),
                                            **({} if prev_total_ms is None else {"prev_total_ms": prev_total_ms})}
                    await ws.send(msgpack_numpy.packb(out))
                finally:
                    self._inflight -= 1
                prev_total_ms = 1000 * (time.perf_counter() - t0)
        except ConnectionClosed:
            pass  # the client left; its pending result (if any) is dropped by the batcher
        finally:
            self._clients.discard(cid)

    @staticmethod
    async def _refuse(ws: ServerConnection, text: str, code: int = 1003) -> None:
        log.warning("closing a connection: %s", text)
        try:
            await ws.send(text)  # openpi's client raises a text reply as an error
            await ws.close(code, text[:120])
        except ConnectionClosed:
            pass

    # ----- batching ---------------------------------------------------------------------------------
    async def _next_batch(self) -> list[_Request]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.window
        while len(batch) < self.max_batch:
            while not self._queue.empty() and len(batch) < self.max_batch:
                batch.append(self._queue.get_nowait())
            if len(batch) >= self.max_batch:
                break
            if self._clients <= {r.client for r in batch}:
                self.close_reasons.append("everyone-in")  # nobody else could join: do not wait
                return batch
            if time.perf_counter() >= deadline:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                break
        self.close_reasons.append("full" if len(batch) >= self.max_batch else "window")
        return batch

    def _infer(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], float]:
        batch = {k: np.stack([r[k] for r in rows]) for k in ("image", "wrist_image", "state")}
        batch["prompt"] = [r["prompt"] for r in rows]
        t0 = time.perf_counter()
        out = self.policy.infer(batch)
        return out, 1000 * (time.perf_counter() - t0)

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [r for r in batch if not r.result.done()]
            if not live:
                continue
            self.batch_sizes.append(len(live))
            try:
                out, ms = await loop.run_in_executor(self._executor, self._infer, [r.row for r in live])
                actions, errors = check_actions(out, len(live))
            except Exception as exc:
                log.error("policy call failed:\n%s", traceback.format_exc())
                for r in live:
                    if not r.result.done():
                        r.result.set_exception(RuntimeError(f"{type(exc).__name__}: {exc}"))
                continue
            timing = out.get("policy_timing", {"infer_ms": ms})
            for i, r in enumerate(live):
                if r.result.done():
                    continue
                if actions is None:  # wrong type or shape: nothing to send (NaN rows are sent as they are,
                    r.result.set_exception(RuntimeError(errors[i]))  # like openpi; clients check them)
                else:
                    r.result.set_result({"actions": actions[i].astype(np.float32), "policy_timing": dict(timing),
                                         "_batch_ms": ms})

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or `stop()`), then finish what was received and return."""
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stopping.set)
            except (ValueError, RuntimeError):  # not the main thread (tests run servers in threads)
                pass
        batcher = asyncio.create_task(self._batcher())
        async with serve(self._handle, self.host, self.port, process_request=self._health, compression=None,
                         max_size=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            self.started.set()
            log.info("serving %s on ws://%s:%d", type(self.policy).__name__, self.host, self.port)
            await self._stopping.wait()
            log.info("stopping: finishing %d request(s) in flight", self._inflight)
            server.close(close_connections=False)  # no new connections; open ones get their answers
            while self._inflight:
                await asyncio.sleep(0.005)
            for ws in list(server.connections):
                await ws.close(1001, "server shutting down")
        batcher.cancel()
        self._executor.shutdown(wait=True)

    def stop(self) -> None:
        """Ask the server to finish (callable from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
