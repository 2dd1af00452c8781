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

Decoding and image preprocessing run in a small thread pool (`decode_workers`), off the event loop,
so a client sending large images does not hold up the others' receiving and batching. Messages are
decoded by policy/wire.py, which accepts only numeric arrays of consistent size (openpi's own decoder
trusts the client's dtype: an object dtype crashes the process).

Robustness: a malformed or wrong-shaped message gets an error reply (a text message) and that
connection is closed (the server goes on); a message over `max_message_mb` is refused by websockets
with close code 1009 "message too big" before it is buffered; a client that disconnects mid-request
has its request dropped before the policy call; a policy that raises or returns something unusable
fails that batch's requests with an error reply and the batcher goes on; SIGTERM stops accepting
connections, finishes the requests already received, answers them, and exits.

Security: binds 127.0.0.1 unless told otherwise (`host=0.0.0.0` serves other machines). With
`api_key` set, the websocket handshake needs openpi-client's header `Authorization: Api-Key <key>`
(openpi_client/websocket_client_policy.py) and is otherwise answered HTTP 401; /healthz stays open.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hmac
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from envs.checks import check_int
from openpi_client.image_tools import resize_with_pad
from policy.base import check_actions
from policy import wire

log = logging.getLogger(__name__)

IMAGE_KEYS = {"observation/image": "image", "observation/wrist_image": "wrist_image"}
MAX_PROMPT_CHARS = 10_000  # LIBERO's instructions are < 200 characters; the tokenizer sees ~200 tokens


class BadRequest(ValueError):
    pass


def _image(value: Any, key: str, size: int) -> np.ndarray:
    if not isinstance(value, np.ndarray):  # policy/wire.py made every array; anything else is not an image
        raise BadRequest(f"{key} must be an image array (H, W, 3), got {type(value).__name__}")
    img = value
    if img.ndim != 3:
        raise BadRequest(f"{key} must be an image (H, W, 3), got shape {img.shape}")
    if img.shape[0] == 3 and img.shape[-1] != 3:  # CHW, as openpi accepts
        img = img.transpose(1, 2, 0)
    if img.shape[-1] != 3:
        raise BadRequest(f"{key} must have 3 channels, got shape {img.shape}")
    h, w = img.shape[:2]
    ratio = max(w / size, h / size)
    if min(h, w) < 1 or int(h / ratio) < 1 or int(w / ratio) < 1:  # resize_with_pad's sizes, which PIL needs >= 1
        raise BadRequest(f"{key} of shape {img.shape} cannot be resized to {size}x{size}")
    if np.issubdtype(img.dtype, np.floating):  # openpi: float images in [0, 1] become uint8
        if not np.isfinite(img).all():
            raise BadRequest(f"{key} holds NaN or inf pixels")
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range floats wrap, as in openpi
            img = (255 * img).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise BadRequest(f"{key} must be uint8 or float, got {img.dtype}")
    return resize_with_pad(img, size, size)


def _state(value: Any) -> np.ndarray:
    if isinstance(value, (list, tuple)) and all(type(x) in (int, float) for x in value):
        value = np.asarray(value, dtype=np.float64)  # a plain list of numbers is fine too
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise BadRequest(f"observation/state must be an array of 8 numbers, got "
                         f"{type(value).__name__}{' of dtype ' + str(value.dtype) if isinstance(value, np.ndarray) else ''}")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf and is refused below
        state = value.astype(np.float32)
    if state.shape != (8,) or not np.all(np.isfinite(state)):
        raise BadRequest(f"observation/state must be 8 finite numbers (LIBERO's state), got shape {state.shape}")
    return state


def parse_observation(obs: Any, image_size: int = 224) -> dict[str, Any]:
    """openpi's LIBERO observation dict (as policy/wire.py decodes it) -> one row of our batch format
    (see policy/base.py). Raises BadRequest naming what is wrong."""
    if not isinstance(obs, dict):
        raise BadRequest(f"expected an observation dict, got {type(obs).__name__}")
    missing = [k for k in (*IMAGE_KEYS, "observation/state", "prompt") if k not in obs]
    if missing:
        raise BadRequest(f"observation is missing {missing}; expected keys {[*IMAGE_KEYS, 'observation/state', 'prompt']}")
    row = {ours: _image(obs[k], k, image_size) for k, ours in IMAGE_KEYS.items()}
    row["state"] = _state(obs["observation/state"])
    prompt = obs["prompt"]
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode()
        except UnicodeDecodeError:
            raise BadRequest("prompt is not valid UTF-8") from None
    if not isinstance(prompt, str):
        raise BadRequest(f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"prompt has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}")
    row["prompt"] = prompt
    episode, step = obs.get(EPISODE_KEY), obs.get(STEP_KEY)
    if episode is not None or step is not None:  # our extension (EXTENSION): optional, checked strictly
        if not (isinstance(episode, (list, tuple)) and 0 < len(episode) <= 8
                and all(isinstance(x, (str, int)) and not isinstance(x, bool) and len(str(x)) <= 64 for x in episode)):
            raise BadRequest(f"{EPISODE_KEY} must be a list of at most 8 short strings or integers")
        if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 10**9):
            raise BadRequest(f"{STEP_KEY} must be an integer >= 0")
        row["episode"], row["step"] = tuple(episode), step
    return row


# Our extension of openpi's observation dict: the episode a row belongs to and its step, so a policy
# that seeds its noise per episode (Pi05Policy) gives a remote client the same actions as in process.
# Advertised in the metadata; openpi's servers neither send the flag nor see the keys.
EXTENSION = "episode_step"
EPISODE_KEY, STEP_KEY = "harness/episode", "harness/step"


def decode_observation(message: bytes, image_size: int = 224) -> dict[str, Any]:
    """One client message -> one batch row; raises BadRequest (bad content) or wire.WireError (bad bytes)."""
    return parse_observation(wire.unpackb(message), image_size)


@dataclass
class _Request:
    row: dict[str, Any]
    client: int
    received: float = field(default_factory=time.perf_counter)
    result: asyncio.Future | None = None


def bound_socket(host: str, port: Any) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening, or a ValueError saying what to change.
    `runners.serve` binds it before loading the policy, so a taken or mistyped port fails in a second,
    not after minutes of loading and compiling; until the server listens, a client's connection is
    refused (openpi's client waits and retries then), not left hanging in a backlog."""
    port = check_int("port", port, 0, 65535)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(str(host), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ValueError(f"host={host!r} cannot be served on ({exc}): give an address of this machine") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's own servers do
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = "is in use (another server?)" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
        raise ValueError(f"port {port} on {host} {why}: choose another port= (or host=)") from None
    return sock


class PolicyServer:
    def __init__(self, policy, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
                 window_ms: float = 5.0, metadata: dict[str, Any] | None = None, image_size: int = 224,
                 max_message_mb: float = 32.0, api_key: str | None = None, decode_workers: int | None = None,
                 max_connections: int = 256, sock: socket.socket | None = None):
        """sock: a bound socket to serve on (`bound_socket`, bound before a slow policy load), else
        host and port are bound when `run` starts. max_connections: more are refused (HTTP 503): each may
        hold ~2 messages of max_message_mb in memory, so the count bounds the server's memory."""
        self.policy, self.host, self.port = policy, host, int(port)
        self._sock = sock
        self.max_connections = check_int("max_connections", max_connections, 1)
        self.max_batch, self.window = int(max_batch), float(window_ms) / 1000.0
        self.image_size = image_size
        if not float(max_message_mb) > 0:
            raise ValueError(f"max_message_mb must be > 0 (MiB), got {max_message_mb!r}")
        self.max_message_mb = float(max_message_mb)
        self.max_size = int(self.max_message_mb * 2**20)
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ValueError("api_key must be a non-empty string, or None for no authentication")
        self._api_key = api_key
        self.metadata = {
            "server": "pi05-harness",
            "chunk_size": getattr(policy, "chunk_size", None),
            "action_dim": 7,
            "max_batch": self.max_batch,
            "extensions": [EXTENSION],
            **(metadata or {}),
        }
        # Recent policy calls' batch sizes, and why each batch stopped waiting (everyone-in, window,
        # full): for logs and tests; bounded so a server running for weeks does not grow.
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._clients: set[int] = set()
        self._inflight = 0  # requests received and not yet answered
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        # Decoding and resizing: numpy, msgpack and PIL release the GIL on large buffers, so two
        # workers already keep a client with huge images from delaying the ones with small images.
        workers = decode_workers or max(2, min(4, os.cpu_count() or 1))
        self._decoder = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.started = threading.Event()  # set once the port is open (self.port is then the real one)
        self.close_reasons: deque[str] = deque(maxlen=10_000)

    # ----- connections ------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request):
        if request.path == "/healthz":  # open even with an API key: load balancers and scripts poll it
            return connection.respond(HTTPStatus.OK, "OK\n")
        if len(self._clients) >= self.max_connections:
            log.warning("refused a connection from %s: %d connections open (max_connections)",
                        connection.remote_address, len(self._clients))
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"server full: {len(self._clients)} connections open (its max_connections); "
                                      f"retry later\n")
        if self._api_key is not None:
            got = request.headers.get("Authorization", "")
            # surrogateescape: websockets decodes header bytes that way; any value compares, none crashes
            if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"),
                                       f"Api-Key {self._api_key}".encode("utf-8", "surrogateescape")):
                log.warning("refused a connection from %s: %s API key", connection.remote_address,
                            "wrong" if got else "no")
                return connection.respond(HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key: send the header 'Authorization: Api-Key "
                                          "<key>' (openpi-client: WebsocketClientPolicy(..., api_key=...); "
                                          "this harness: policy=remote policy.api_key=...)\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        cid = id(ws)
        loop = asyncio.get_running_loop()
        self._clients.add(cid)
        closed = asyncio.ensure_future(ws.wait_closed())  # done as soon as the client is gone
        prev_total_ms = None
        try:
            await ws.send(wire.packb(self.metadata))
            async for message in ws:
                t0 = time.perf_counter()
                if isinstance(message, str):
                    await self._refuse(ws, "bad request: expected a binary msgpack message, got text")
                    return
                try:
                    row = await loop.run_in_executor(self._decoder, decode_observation, message, self.image_size)
                    message = None  # the raw bytes are not kept while the request waits (memory per connection)
                except (BadRequest, wire.WireError) as exc:
                    await self._refuse(ws, f"bad request: {exc}")
                    return
                except Exception as exc:  # a case the checks above missed: still this client's problem alone
                    log.error("decoding a message failed:\n%s", traceback.format_exc())
                    await self._refuse(ws, f"bad request: could not decode the message ({type(exc).__name__}: {exc})")
                    return
                req = _Request(row, cid, t0, loop.create_future())
                self._inflight += 1
                try:
                    await self._queue.put(req)
                    await asyncio.wait({req.result, closed}, return_when=asyncio.FIRST_COMPLETED)
                    if not req.result.done():  # the client left: its request must not take a batch slot
                        req.result.cancel()
                        return
                    try:
                        out = req.result.result()
                        if prev_total_ms is not None:
                            out["server_timing"]["prev_total_ms"] = prev_total_ms
                        reply = wire.packb(out)
                    except Exception as exc:
                        await self._refuse(ws, f"policy error: {exc}", code=1011)
                        return
                    await ws.send(reply)
                finally:
                    self._inflight -= 1
                prev_total_ms = 1000 * (time.perf_counter() - t0)
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                log.warning("closed a connection from %s: %s (the server's max_message_mb is %g)",
                            ws.remote_address, exc.sent.reason, self.max_message_mb)
            # otherwise the client left; its pending request (if any) was cancelled above
        finally:
            closed.cancel()
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

    def _infer(self, rows: list[dict[str, Any]]) -> tuple[Any, float]:
        batch = {k: np.stack([r[k] for r in rows]) for k in ("image", "wrist_image", "state")}
        batch["prompt"] = [r["prompt"] for r in rows]
        if any("episode" in r for r in rows):
            batch["episode"] = [r.get("episode") for r in rows]  # None: a client that did not say
            batch["step"] = [r.get("step", 0) for r in rows]
        t0 = time.perf_counter()
        out = self.policy.infer(batch)
        return out, 1000 * (time.perf_counter() - t0)

    @staticmethod
    def _replies(out: Any, ms: float, n: int) -> list[dict[str, Any] | Exception]:
        """The policy's output -> one reply (or the error to send instead) per row."""
        actions, errors = check_actions(out, n)
        if actions is None:  # wrong type or shape: nothing to send (NaN rows are sent as they are,
            return [RuntimeError(e) for e in errors]  # like openpi; clients check them)
        timing = out.get("policy_timing")
        if not isinstance(timing, dict):
            timing = {"infer_ms": ms}
        # only numbers: whatever else a policy put there might not pack
        timing = {str(k): float(v) for k, v in timing.items() if type(v) in (int, float) or isinstance(v, np.number)}
        # A row the policy failed (a remote policy behind this server timed out, NaN actions) is sent as
        # it is, like openpi; its `error` says why (openpi-client ignores the key, policy=remote reads it).
        return [{"actions": actions[i].astype(np.float32), "policy_timing": dict(timing),
                 "server_timing": {"infer_ms": ms}, **({"error": errors[i]} if errors[i] else {})} for i in range(n)]

    async def _run_batch(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.result.done()]  # cancelled: the client left while queued
        if not live:
            return
        self.batch_sizes.append(len(live))
        loop = asyncio.get_running_loop()
        try:
            out, ms = await loop.run_in_executor(self._executor, self._infer, [r.row for r in live])
            replies = self._replies(out, ms, len(live))
        except Exception as exc:
            log.error("policy call failed:\n%s", traceback.format_exc())
            replies = [RuntimeError(f"{type(exc).__name__}: {exc}")] * len(live)
        for r, reply in zip(live, replies):
            if r.result.done():
                continue
            if isinstance(reply, Exception):
                r.result.set_exception(reply)
            else:
                r.result.set_result(reply)

    async def _batcher(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._run_batch(batch)
            except Exception as exc:  # a bug of ours must not stop the batcher: every later request would hang
                log.error("batch failed:\n%s", traceback.format_exc())
                for r in batch:
                    if not r.result.done():
                        r.result.set_exception(RuntimeError(f"server error: {type(exc).__name__}: {exc}"))

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or `stop()`), then finish what was received and return."""
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stopping.set)
            except (ValueError, RuntimeError):  # not the main thread (tests run servers in threads)
                pass
        batcher = asyncio.create_task(self._batcher())
        # max_size: websockets refuses a bigger message from its header (close 1009) before buffering
        # it. max_queue: frames buffered per connection while its request waits (a client of openpi's
        # protocol has one request out at a time), so at most ~2 x max_size per connection.
        where = {"sock": self._sock} if self._sock is not None else {"host": self.host, "port": self.port}
        async with serve(self._handle, process_request=self._process_request, compression=None,
                         max_size=self.max_size, max_queue=2, **where) as server:
            self.port = server.sockets[0].getsockname()[1]
            self.started.set()
            log.info("serving %s on ws://%s:%d (max message %g MiB%s)", type(self.policy).__name__, self.host,
                     self.port, self.max_message_mb, ", API key required" if self._api_key else "")
            await self._stopping.wait()
            log.info("stopping: finishing %d request(s) in flight", self._inflight)
            server.close(close_connections=False)  # no new connections; open ones get their answers
            while self._inflight:
                await asyncio.sleep(0.005)
            for ws in list(server.connections):
                await ws.close(1001, "server shutting down")
        batcher.cancel()
        self._executor.shutdown(wait=True)
        self._decoder.shutdown(wait=True)

    def stop(self) -> None:
        """Ask the server to finish (callable from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
