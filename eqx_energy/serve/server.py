"""Websocket policy server speaking openpi's wire protocol (openpi.md section 6), built to face a robot.

Per connection: send `packb(policy.metadata)` first (a binary frame), then loop
recv -> `unpackb` -> `policy.infer(obs)` -> add `server_timing` -> send `packb(reply)`.

    reply = policy.infer(obs)     # {"actions": (h, a) array, ..., "policy_timing": {"infer_ms", ["correction_ms"]}}
    reply["server_timing"] = {"infer_ms": time in policy.infer,
                              "prev_total_ms": previous iteration's time from waiting for the request to
                                               sending the reply, as openpi measures it (from the 2nd request on)}

Errors. A request that fails (undecodable bytes, a text frame, an observation the policy rejects, a
full inference queue) is answered with one text frame of one line, and the connection keeps serving:

    "ValueError: 'observation/state' must have shape (4,); got (3,) [request 5f0c2a9e1b7d]"

openpi's client raises on a text reply, as ours does. A ValueError or TypeError (the request's fault)
carries its message; any other exception only its type, since its message may hold internals. No
traceback reaches the client; the server log has it under the same request id.

Access. The default bind is 127.0.0.1. With `api_key`, every HTTP request (the websocket handshake
and /healthz) must carry `Authorization: Api-Key <key>`, the header openpi's client sends; a missing
or wrong key gets HTTP 401 before any frame. The comparison is constant time (`hmac.compare_digest`)
and the key never reaches the logs (websockets' debug log of request headers is redacted) or the
metadata. Binding another address without a key logs a warning.

Limits (constructor arguments; `correct.py serve` flags):
- `max_connections`: one more is closed at once with code 1013 (try again later), the reason naming the cap;
- `max_size` bytes per message (larger: close 1009). One request per connection is handled at a
  time; websockets buffers at most `max_queue` further frames, then stops reading the socket, so a
  connection holds at most (max_queue + 1) x max_size bytes of requests;
- `max_pending` requests being decoded, waiting for or in inference over all connections; beyond it
  the reply is a `ServerBusy` error. Requests are decoded one at a time in a thread of their own:
  a frame that is slow to decode (msgpack of many tiny maps: ~1 s and ~70 MB per MiB) then stalls
  neither health checks, pings, new connections nor inference, and only one expands in memory;
- `idle_timeout_s`: a connection with no request for that long is closed (code 1000, reason says why);
- `keepalive_s`: websockets pings every keepalive_s; a peer that does not answer a ping or a close
  within keepalive_s (gone, or no longer reading its replies) is dropped. An opening handshake must
  finish within 10 s (websockets' default).

Shutdown (SIGTERM/SIGINT in `serve_forever`, or leaving `running()`): stop accepting connections,
answer each request already taken, close every connection with 1001 (going away), then return. A
second signal stops at once.

Unlike openpi, `policy.infer` runs in a worker thread so the event loop keeps answering health
checks, pings and new connections during a long inference; one worker runs one inference at a time,
in arrival order (a policy may hold state, such as openpi's rng). Decoded arrays are read-only views
of the received bytes: a policy copies before it writes (openpi's Policy copies the obs dict too).
HTTP GET `/healthz` answers 200 "OK\\n"; other paths go on to the websocket upgrade.
"""

import asyncio
import contextlib
import hmac
import http
import ipaddress
import logging
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import websockets
import websockets.asyncio.server as ws_server
from websockets.frames import CloseCode

from eqx_energy.serve import wire

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_SIZE = 16 * 2**20
"""Largest accepted message in bytes: ample for LIBERO/DROID observations (3 x 224x224x3 uint8 is 0.45 MB)."""
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_MAX_PENDING = 8
DEFAULT_MAX_QUEUE = 2
DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_KEEPALIVE_S = 20.0

_API_KEY = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: safe in an HTTP header value
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ServerBusy(Exception):
    """`max_pending` requests are already being decoded or inferred; the client may retry shortly."""


_SHOWN_ERRORS = (ValueError, TypeError, ServerBusy)  # the request's fault: their messages reach the client


class _RedactAuthorization(logging.Filter):
    """websockets logs every request header at DEBUG; this hides the Authorization value (the API key)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 2 and str(record.args[0]).lower() == "authorization":
            record.args = (record.args[0], "<redacted>")
        return True


_ws_logger = logging.getLogger(f"{__name__}.websockets")
_ws_logger.addFilter(_RedactAuthorization())


@runtime_checkable
class Policy(Protocol):
    """openpi's BasePolicy shape: anything with `infer(obs) -> dict` and a `metadata` dict."""

    metadata: dict

    def infer(self, obs: dict) -> dict: ...


class PolicyServer:
    """Serves `policy` over websockets on `host:port` (port 0 picks a free port); limits and access as in
    the module docstring.

    `serve_forever()` blocks (the CLI); `with server.running() as port:` serves from a background
    thread (tests, benchmarks, in-process closed-loop evaluation). `max_size=None` accepts messages
    of any size and `idle_timeout_s=None` keeps idle connections open, as openpi's server does.
    """

    policy: Policy
    host: str
    port: int
    max_size: int | None
    max_connections: int
    max_pending: int
    max_queue: int
    idle_timeout_s: float | None
    keepalive_s: float
    metadata: dict
    _authorization: bytes | None
    _stop: asyncio.Event
    _decoder: ThreadPoolExecutor
    _worker: ThreadPoolExecutor
    _open: int
    _pending: int

    def __init__(
        self,
        policy: Policy,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        api_key: str | None = None,
        max_size: int | None = DEFAULT_MAX_SIZE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_queue: int = DEFAULT_MAX_QUEUE,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
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
        if api_key is not None and not _API_KEY.fullmatch(api_key):
            raise ValueError(
                f"api_key must be non-empty printable ASCII without spaces (it travels in an HTTP header); "
                f"got a {len(api_key)}-character key that is not: leave it unset for no key"
            )
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be a positive byte count or None (no limit); got {max_size}")
        for name, value in (("max_connections", max_connections), ("max_pending", max_pending),
                            ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")
        if idle_timeout_s is not None and idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be > 0 seconds or None (never close idle connections); "
                             f"got {idle_timeout_s}")
        if keepalive_s <= 0:
            raise ValueError(f"keepalive_s must be > 0 seconds; got {keepalive_s}")
        self.policy = policy
        self.host = host
        self.port = port
        self.max_size = max_size
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_queue = max_queue
        self.idle_timeout_s = idle_timeout_s
        self.keepalive_s = keepalive_s
        self.metadata = metadata
        self._authorization = None if api_key is None else f"Api-Key {api_key}".encode()

    def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully (module docstring)."""

        async def main() -> None:
            loop, stop = asyncio.get_running_loop(), asyncio.Event()

            def on_signal(sig: signal.Signals) -> None:
                logger.info("%s: answering the requests in flight, then stopping (again: stop at once)", sig.name)
                stop.set()
                for s in _SIGNALS:  # back to the default handlers, so a second signal stops at once
                    loop.remove_signal_handler(s)

            for s in _SIGNALS:
                loop.add_signal_handler(s, on_signal, s)
            def on_ready(port: int) -> None:
                logger.info("serving policy on %s:%d (health check: GET /healthz)", self.host, port)

            await self._serve(stop, on_ready)
            logger.info("stopped")

        asyncio.run(main())

    @contextlib.contextmanager
    def running(self) -> Iterator[int]:
        """Serve from a background thread while the block runs; yields the bound port."""
        ready = threading.Event()
        state: dict[str, Any] = {}

        def on_ready(port: int) -> None:
            state["port"] = port
            ready.set()

        async def main() -> None:
            state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
            try:
                await self._serve(state["stop"], on_ready)
            except BaseException as e:  # a startup failure (port in use, bad host) is re-raised below
                if ready.is_set():
                    raise
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
            state["loop"].call_soon_threadsafe(state["stop"].set)
            thread.join()

    async def _serve(self, stop: asyncio.Event, on_ready: Callable[[int], None]) -> None:
        """Serve until `stop` is set, then drain: no new connections, finish the requests taken."""
        if self._authorization is None and not _is_loopback(self.host):
            logger.warning(
                "serving on %s without an API key: anyone who can reach this port can drive the policy; "
                "set --api-key (or its environment variable) or bind 127.0.0.1", self.host,
            )
        self._stop, self._open, self._pending = stop, 0, 0
        with (
            ThreadPoolExecutor(1, thread_name_prefix="PolicyServer-decode") as self._decoder,
            ThreadPoolExecutor(1, thread_name_prefix="PolicyServer-infer") as self._worker,
        ):
            async with ws_server.serve(
                self._handle,
                self.host,
                self.port,
                compression=None,
                max_size=self.max_size,
                max_queue=self.max_queue,
                ping_interval=self.keepalive_s,
                ping_timeout=self.keepalive_s,
                close_timeout=self.keepalive_s,
                process_request=self._process_request,
                logger=_ws_logger,
            ) as server:
                on_ready(server.sockets[0].getsockname()[1])
                await stop.wait()
                logger.info("stopping: no new connections; %d requests in flight", self._pending)
                server.close(close_connections=False)  # each handler closes its connection once idle
                await server.wait_closed()

    def _process_request(
        self, connection: ws_server.ServerConnection, request: ws_server.Request
    ) -> ws_server.Response | None:
        """401 without the API key; GET /healthz -> 200 "OK\\n"; anything else goes on to the handshake."""
        if self._authorization is not None:
            sent = request.headers.get_all("Authorization")
            given = sent[0].encode("utf-8", "surrogateescape") if len(sent) == 1 else b""
            if not hmac.compare_digest(given, self._authorization):
                logger.warning("refused %s from %s: missing or wrong API key", request.path, connection.remote_address)
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send 'Authorization: Api-Key <key>'\n"
                )
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    async def _handle(self, websocket: ws_server.ServerConnection) -> None:
        remote = websocket.remote_address
        if self._open >= self.max_connections:
            logger.warning("refused a connection from %s: %d open (max_connections)", remote, self._open)
            reason = f"server full: max_connections={self.max_connections} are open; try again later"
            await websocket.close(CloseCode.TRY_AGAIN_LATER, reason)
            return
        self._open += 1
        logger.info("connection from %s opened", remote)
        try:
            await self._serve_connection(websocket)
        except websockets.ConnectionClosed:
            logger.info("connection from %s closed", remote)
        finally:
            self._open -= 1

    async def _serve_connection(self, websocket: ws_server.ServerConnection) -> None:
        packer = wire.packer()
        prev_total_ms = None
        await websocket.send(packer.pack(self.metadata))
        while True:
            start = time.monotonic()
            message = await self._next_message(websocket)
            if message is None:
                return
            try:
                reply, infer_ms = await self._infer(message)
                reply["server_timing"] = {"infer_ms": infer_ms}
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                frame = packer.pack(reply)
            except Exception as e:
                frame = _error_reply(e, websocket.remote_address)
            await websocket.send(frame)
            prev_total_ms = (time.monotonic() - start) * 1000

    async def _next_message(self, websocket: ws_server.ServerConnection) -> str | bytes | None:
        """The next request; None (after closing the connection) when the server is stopping or the
        client sent nothing for `idle_timeout_s`."""
        if not self._stop.is_set():  # while stopping, only the request already taken is answered
            recv = asyncio.ensure_future(websocket.recv())
            stopping = asyncio.ensure_future(self._stop.wait())
            try:
                done, _ = await asyncio.wait(
                    (recv, stopping), timeout=self.idle_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stopping.cancel()
                recv.cancel()  # no-op when done; websockets keeps an unreceived message for the next recv
            if recv in done:
                return recv.result()
            if not self._stop.is_set():
                reason = f"no request for {self.idle_timeout_s:g} s (idle_timeout_s); reconnect to continue"
                logger.info("closing idle connection from %s", websocket.remote_address)
                await websocket.close(CloseCode.NORMAL_CLOSURE, reason)
                return None
        await websocket.close(CloseCode.GOING_AWAY, "server shutting down")
        return None

    async def _infer(self, message: str | bytes) -> tuple[dict, float]:
        """Decode one request in the decoder thread, then run the policy in the worker thread (each one
        at a time, in arrival order); returns (reply, infer_ms). Both count against `max_pending`."""
        if self._pending >= self.max_pending:
            raise ServerBusy(
                f"{self._pending} requests are already being decoded or waiting for inference "
                f"(max_pending={self.max_pending}); retry shortly"
            )
        if isinstance(message, str):
            raise ValueError(
                "expected a binary frame holding a msgpack observation; got a text frame "
                f"({len(message)} characters): send `wire.packb(obs)` bytes, as openpi's client does"
            )
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            obs = await loop.run_in_executor(self._decoder, wire.unpackb, message)
            if not isinstance(obs, dict):
                raise ValueError(f"the observation must be a msgpack map (dict); got {type(obs).__name__}")
            reply, infer_ms = await loop.run_in_executor(self._worker, self._timed_infer, obs)
        finally:
            self._pending -= 1
        if not isinstance(reply, dict):
            raise ValueError(f"policy.infer must return a dict; got {type(reply).__name__}")
        return reply, infer_ms

    def _timed_infer(self, obs: dict) -> tuple[Any, float]:
        start = time.monotonic()
        reply = self.policy.infer(obs)
        return reply, (time.monotonic() - start) * 1000


def _error_reply(error: Exception, remote: Any) -> str:
    """One line for the client, "Type: message [request id]"; the traceback goes to the log under that id."""
    request_id = secrets.token_hex(6)
    if isinstance(error, ServerBusy):
        logger.warning("request %s from %s refused: %s", request_id, remote, error)
    else:
        logger.error("request %s from %s failed", request_id, remote, exc_info=error)
    if isinstance(error, _SHOWN_ERRORS):
        detail = " ".join(str(error).split())
    else:
        detail = "internal error; the server log has the traceback"
    return f"{type(error).__name__}: {detail} [request {request_id}]"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"
