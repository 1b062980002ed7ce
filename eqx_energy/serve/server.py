"""Websocket policy server speaking openpi's wire protocol (openpi.md section 6).

Per connection: send `packb(policy.metadata)` first (a binary frame), then loop
recv -> `unpackb` -> `policy.infer(obs)` -> add `server_timing` -> send `packb(reply)`.

    reply = policy.infer(obs)     # {"actions": (h, a) array, ..., "policy_timing": {"infer_ms", ["correction_ms"]}}
    reply["server_timing"] = {"infer_ms": time in policy.infer,
                              "prev_total_ms": previous iteration's time from waiting for the request to
                                               sending the reply, as openpi measures it (from the 2nd request on)}

An error while handling one request (undecodable bytes, a text frame, an observation the policy
rejects) is reported to that client as openpi does, a text frame holding the traceback, then a
close with code 1011 ("Internal server error. Traceback included in previous frame."); the server
keeps serving everyone else. A message over `max_size` bytes closes that connection with code
1009 (message too big). HTTP GET `/healthz` answers 200 "OK\\n"; other paths go on to the
websocket upgrade.

Unlike openpi, `policy.infer` runs in a worker thread so the event loop keeps answering health
checks, pings and new connections during a long inference; a lock still runs one inference at a
time (a policy may hold state, such as openpi's rng). Decoded arrays are read-only views of the
received bytes: a policy copies before it writes (openpi's Policy copies the obs dict too).
"""

import asyncio
import contextlib
import http
import logging
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import websockets
import websockets.asyncio.server as ws_server
from websockets.frames import CloseCode

from eqx_energy.serve import wire

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000
DEFAULT_MAX_SIZE = 16 * 2**20
"""Largest accepted message in bytes: ample for LIBERO/DROID observations (3 x 224x224x3 uint8 is 0.45 MB)."""

_ERROR_REASON = "Internal server error. Traceback included in previous frame."


@runtime_checkable
class Policy(Protocol):
    """openpi's BasePolicy shape: anything with `infer(obs) -> dict` and a `metadata` dict."""

    metadata: dict

    def infer(self, obs: dict) -> dict: ...


class PolicyServer:
    """Serves `policy` over websockets on `host:port` (port 0 picks a free port).

    `serve_forever()` blocks (the CLI); `with server.running() as port:` serves from a background
    thread (tests, benchmarks, in-process closed-loop evaluation). `max_size=None` accepts messages
    of any size, as openpi's server does.
    """

    policy: Policy
    host: str
    port: int
    max_size: int | None
    metadata: dict
    _infer_lock: threading.Lock

    def __init__(
        self,
        policy: Policy,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        max_size: int | None = DEFAULT_MAX_SIZE,
    ):
        if not callable(getattr(policy, "infer", None)):
            raise ValueError(
                f"policy must have an `infer(obs: dict) -> dict` method (openpi's BasePolicy); "
                f"got {type(policy).__name__} without one"
            )
        metadata = getattr(policy, "metadata", None)
        if not isinstance(metadata, dict):
            raise ValueError(
                f"policy.metadata must be a dict (sent to each client on connect; use {{}} for none); "
                f"got {type(metadata).__name__}"
            )
        if not 0 <= port < 2**16:
            raise ValueError(f"port must be in [0, 65535] (0 = pick a free port); got {port}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be a positive byte count or None (no limit); got {max_size}")
        self.policy = policy
        self.host = host
        self.port = port
        self.max_size = max_size
        self.metadata = metadata
        self._infer_lock = threading.Lock()

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C)."""
        with self.running() as port:
            logger.info("serving policy on %s:%d (health check: GET /healthz)", self.host, port)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                logger.info("interrupted; closing connections and stopping")

    @contextlib.contextmanager
    def running(self) -> Iterator[int]:
        """Serve from a background thread while the block runs; yields the bound port."""
        ready = threading.Event()
        state: dict[str, Any] = {}

        async def main() -> None:
            try:
                async with self._serve() as server:
                    stop = asyncio.get_running_loop().create_future()
                    state["loop"], state["stop"] = asyncio.get_running_loop(), stop
                    state["port"] = server.sockets[0].getsockname()[1]
                    ready.set()
                    await stop
            except BaseException as e:  # startup failure (port in use, bad host): re-raised below
                state["error"] = e
                ready.set()

        thread = threading.Thread(target=asyncio.run, args=(main(),), name="PolicyServer", daemon=True)
        thread.start()
        ready.wait()
        if "error" in state:
            thread.join()
            raise state["error"]
        try:
            yield state["port"]
        finally:
            state["loop"].call_soon_threadsafe(state["stop"].set_result, None)
            thread.join()

    def _serve(self) -> ws_server.Server:
        return ws_server.serve(
            self._handle,
            self.host,
            self.port,
            compression=None,
            max_size=self.max_size,
            process_request=_health_check,
        )

    async def _handle(self, websocket: ws_server.ServerConnection) -> None:
        logger.info("connection from %s opened", websocket.remote_address)
        packer = wire.packer()
        prev_total_ms = None
        try:
            await websocket.send(packer.pack(self.metadata))
            while True:
                start = time.monotonic()
                message = await websocket.recv()
                reply, infer_ms = await self._infer(message)
                reply["server_timing"] = {"infer_ms": infer_ms}
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await websocket.send(packer.pack(reply))
                prev_total_ms = (time.monotonic() - start) * 1000
        except websockets.ConnectionClosed:
            logger.info("connection from %s closed", websocket.remote_address)
        except Exception:
            logger.exception("request from %s failed; reporting it to the client", websocket.remote_address)
            with contextlib.suppress(websockets.ConnectionClosed):
                await websocket.send(traceback.format_exc())
            await websocket.close(code=CloseCode.INTERNAL_ERROR, reason=_ERROR_REASON)

    async def _infer(self, message: str | bytes) -> tuple[dict, float]:
        """Decode one request, run the policy (one at a time, off the event loop); returns (reply, infer_ms)."""
        if isinstance(message, str):
            raise ValueError(
                "expected a binary frame holding a msgpack observation; got a text frame "
                f"({len(message)} characters): send `wire.packb(obs)` bytes, as openpi's client does"
            )
        obs = wire.unpackb(message)
        if not isinstance(obs, dict):
            raise ValueError(f"the observation must be a msgpack map (dict); got {type(obs).__name__}")
        reply, infer_ms = await asyncio.to_thread(self._infer_one_at_a_time, obs)
        if not isinstance(reply, dict):
            raise ValueError(f"policy.infer must return a dict; got {type(reply).__name__}")
        return reply, infer_ms

    def _infer_one_at_a_time(self, obs: dict) -> tuple[Any, float]:
        with self._infer_lock:
            start = time.monotonic()
            reply = self.policy.infer(obs)
            return reply, (time.monotonic() - start) * 1000


def _health_check(connection: ws_server.ServerConnection, request: ws_server.Request) -> ws_server.Response | None:
    """HTTP GET /healthz -> 200 "OK\\n"; anything else continues to the websocket handshake."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None
