"""Websocket policy client with openpi's `WebsocketClientPolicy` semantics (openpi.md section 6.4).

URI: `host` as given when it starts with "ws", else "ws://{host}", plus ":{port}" when a port is
given. On connect the first frame is the server's metadata. `infer(obs)` sends `packb(obs)` and
receives one frame: bytes decode to the reply dict; a text frame is the server's error and
raises `RuntimeError("Error in inference server:\\n" + text)`. Frames decode with the server's
own checks (`wire.unpackb`), so a hostile or broken server raises `wire.WireError`, never a crash.
While the server refuses connections the client retries every `retry_s` seconds, for at most
`wait_s` seconds in all (`wait_s=None` waits forever, as openpi does).
"""

import contextlib
import logging
import time

import websockets.sync.client as ws_client

from eqx_energy.serve import wire

logger = logging.getLogger(__name__)


class PolicyClient:
    """`PolicyClient(host, port).infer(obs) -> dict`; a context manager that closes the socket."""

    uri: str
    metadata: dict

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int | None = None,
        *,
        api_key: str | None = None,
        wait_s: float | None = 60.0,
        retry_s: float = 5.0,
    ):
        if wait_s is not None and wait_s < 0:
            raise ValueError(f"wait_s must be >= 0 seconds or None (wait forever); got {wait_s}")
        if retry_s <= 0:
            raise ValueError(f"retry_s must be > 0 seconds; got {retry_s}")
        self.uri = host if host.startswith("ws") else f"ws://{host}"
        if port is not None:
            self.uri += f":{port}"
        self._packer = wire.packer()
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._exit = contextlib.ExitStack()  # websockets wants its connection used as a context manager
        self._ws = self._exit.enter_context(self._connect(headers, wait_s, retry_s))
        try:
            self.metadata = self._recv_metadata()
        except BaseException:
            self._exit.close()
            raise

    def _connect(self, headers: dict | None, wait_s: float | None, retry_s: float) -> ws_client.ClientConnection:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        logger.info("waiting for server at %s...", self.uri)
        while True:
            try:
                # proxy=None: connect directly, as openpi's client does (its websockets predates proxy support).
                return ws_client.connect(
                    self.uri, compression=None, max_size=None, additional_headers=headers, proxy=None
                )
            except ConnectionRefusedError:
                if deadline is not None and time.monotonic() + retry_s > deadline:
                    raise ConnectionRefusedError(
                        f"no policy server at {self.uri} after waiting {wait_s} s; start one with "
                        "`python correct.py serve --ckpt ...` or pass a larger wait_s"
                    ) from None
                logger.info("still waiting for server...")
                time.sleep(retry_s)

    def _recv_metadata(self) -> dict:
        metadata = wire.unpackb(self._ws.recv())
        if not isinstance(metadata, dict):
            raise RuntimeError(f"the server's first frame must be its metadata dict; got {type(metadata).__name__}")
        return metadata

    def get_server_metadata(self) -> dict:
        """The metadata dict the server sent on connect (openpi's name for it)."""
        return self.metadata

    def infer(self, obs: dict) -> dict:
        """One round trip: obs -> the policy's reply (`actions`, `policy_timing`, `server_timing`, ...)."""
        self._ws.send(self._packer.pack(obs))
        reply = self._ws.recv()
        if isinstance(reply, str):  # the server sends its error as text
            raise RuntimeError(f"Error in inference server:\n{reply}")
        return wire.unpackb(reply)

    def reset(self) -> None:
        """Start of a new episode; a no-op, as in openpi (the server keeps no episode state)."""

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
