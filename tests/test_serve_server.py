"""Policy server and client on loopback: metadata frame, round trips, errors, size limit, concurrency, /healthz.

One server (module fixture) serves every test, so the error tests also show that it keeps serving.
"""

import inspect
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed, InvalidStatus

from eqx_energy.serve import PolicyClient, PolicyServer, ToyPolicy, wire

MAX_SIZE = 64 * 1024
TIMEOUT_S = 20.0  # every socket wait in these tests is bounded
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


@pytest.fixture(scope="module")
def policy():
    return ToyPolicy(state_dim=4, horizon=4, action_dim=3, width=16, correction_steps=2, key=jax.random.key(0))


@pytest.fixture(scope="module")
def port(policy):
    with PolicyServer(policy, host="127.0.0.1", port=0, max_size=MAX_SIZE).running() as port:
        yield port


def _obs(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "observation/image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=4),
        "prompt": f"task {i}",
    }


def _raw(port: int) -> ws_client.ClientConnection:
    uri = f"ws://127.0.0.1:{port}"
    return ws_client.connect(uri, compression=None, max_size=None, proxy=None, open_timeout=TIMEOUT_S)


def test_metadata_frame_is_openpi_msgpack(port):
    with _raw(port) as ws:
        first = ws.recv(timeout=TIMEOUT_S)
    # {"policy": "toy", "action_horizon": 4, "action_dim": 3}, written out from the msgpack spec.
    assert first == b"\x83\xa6policy\xa3toy\xaeaction_horizon\x04\xaaaction_dim\x03"


def test_round_trip(policy, port):
    with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as client:
        assert client.get_server_metadata() == {"policy": "toy", "action_horizon": 4, "action_dim": 3}
        replies = [client.infer(_obs(i)) for i in range(3)]
    for i, reply in enumerate(replies):
        direct = policy.infer(_obs(i))
        assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (4, 3)
        np.testing.assert_array_equal(reply["actions"], direct["actions"])
        np.testing.assert_array_equal(reply["state"], _obs(i)["observation/state"])
        assert set(reply["policy_timing"]) == {"infer_ms", "correction_ms"}
        assert 0 < reply["policy_timing"]["correction_ms"] < reply["policy_timing"]["infer_ms"]
        assert reply["server_timing"]["infer_ms"] >= reply["policy_timing"]["infer_ms"]
    assert set(replies[0]["server_timing"]) == {"infer_ms"}
    for reply in replies[1:]:  # the previous iteration's wait + handling time, from the second request on
        assert set(reply["server_timing"]) == {"infer_ms", "prev_total_ms"}
        assert reply["server_timing"]["prev_total_ms"] > 0


def test_ws_uri_form(port):
    with PolicyClient(f"ws://127.0.0.1:{port}", wait_s=TIMEOUT_S) as client:
        assert client.uri == f"ws://127.0.0.1:{port}"
        assert client.infer(_obs(0))["actions"].shape == (4, 3)


ONE_LINE_ERROR = r"(\w+): (.*) \[request ([0-9a-f]{12})\]"


def _assert_one_line_error(report: object, kind: str, message: str) -> str:
    """A one-line "Type: message [request id]" reply: no traceback, no source paths; returns the id."""
    assert isinstance(report, str) and "\n" not in report, report
    match = re.fullmatch(ONE_LINE_ERROR, report)
    assert match and match[1] == kind and re.search(message, match[2]), report
    assert "Traceback" not in report and ".py" not in report and "File " not in report
    return match[3]


@pytest.mark.parametrize(
    "message, kind, error",
    [
        (b"\xc1", "WireError", "malformed msgpack frame"),  # 0xc1 is never used in msgpack
        ("not bytes", "ValueError", "got a text frame"),
        (wire.packb([1, 2, 3]), "ValueError", "must be a msgpack map"),
    ],
)
def test_malformed_message_gets_one_line_error_and_connection_keeps_serving(port, message, kind, error, caplog):
    caplog.set_level(logging.ERROR, logger="eqx_energy.serve.server")
    with _raw(port) as ws:
        ws.recv(timeout=TIMEOUT_S)  # metadata
        ws.send(message)
        request_id = _assert_one_line_error(ws.recv(timeout=TIMEOUT_S), kind, error)
        ws.send(wire.packb(_obs(1)))  # the same connection answers the next request
        assert wire.unpackb(ws.recv(timeout=TIMEOUT_S))["actions"].shape == (4, 3)
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # the traceback, server side only


def test_policy_error_raises_in_client_and_client_keeps_working(port):
    with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as client:
        bad = {k: v for k, v in _obs(0).items() if k != "observation/wrist_image"}
        expected = r"Error in inference server:\nValueError: observation lacks keys \['observation/wrist_image'\]"
        with pytest.raises(RuntimeError, match=expected) as raised:
            client.infer(bad)
        _assert_one_line_error(str(raised.value).split("\n", 1)[1], "ValueError", "lacks keys")
        assert client.infer(_obs(0))["actions"].shape == (4, 3)


def test_internal_error_hides_its_message_and_logs_the_traceback(policy, caplog):
    class Broken:
        metadata = policy.metadata

        def infer(self, obs: dict) -> dict:
            raise RuntimeError("XLA blew up in /opt/secret/path/model.py")

    caplog.set_level(logging.ERROR, logger="eqx_energy.serve.server")
    with PolicyServer(Broken(), port=0).running() as port, _raw(port) as ws:
        ws.recv(timeout=TIMEOUT_S)
        ws.send(wire.packb(_obs(0)))
        report = ws.recv(timeout=TIMEOUT_S)
    request_id = _assert_one_line_error(report, "RuntimeError", "^internal error; the server log has the traceback$")
    assert "secret" not in report
    (record,) = [r for r in caplog.records if request_id in r.getMessage()]
    assert "/opt/secret/path" in str(record.exc_info[1])


def test_oversize_message_closes_that_connection_only(port):
    with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as bystander:
        with _raw(port) as ws:
            ws.recv(timeout=TIMEOUT_S)
            big = dict(_obs(0), **{"observation/image": np.zeros((128, 128, 3), np.uint8)})  # 49 KiB + 49 KiB
            big["observation/wrist_image"] = big["observation/image"]
            ws.send(wire.packb(big))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=TIMEOUT_S)
        assert closed.value.rcvd.code == 1009  # message too big
        assert bystander.infer(_obs(2))["actions"].shape == (4, 3)


def test_two_concurrent_clients(policy, port):
    expected = {i: policy.infer(_obs(i))["actions"] for i in range(8)}
    both_connected = threading.Barrier(2, timeout=TIMEOUT_S)
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(ids: range) -> None:
        try:
            with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as client:
                both_connected.wait()
                for i in ids:
                    got[i] = client.infer(_obs(i))["actions"]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(ids,)) for ids in (range(0, 8, 2), range(1, 8, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sorted(got) == list(range(8))
    for i in range(8):
        np.testing.assert_array_equal(got[i], expected[i])


def test_healthz(port):
    with _OPENER.open(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT_S) as response:
        assert response.status == 200 and response.read() == b"OK\n"


def test_client_gives_up_when_no_server():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError, match="no policy server at ws://127.0.0.1"):
        PolicyClient("127.0.0.1", free, wait_s=0.2, retry_s=0.1)


def test_server_rejects_bad_arguments(policy, port):
    class NoMetadata:
        metadata = None

        def infer(self, obs: dict) -> dict:
            return obs

    with pytest.raises(ValueError, match="policy.metadata must be a dict"):
        PolicyServer(NoMetadata())
    with pytest.raises(ValueError, match="port must be in"):
        PolicyServer(policy, port=70000)
    with pytest.raises(ValueError, match="max_size must be"):
        PolicyServer(policy, max_size=0)
    with pytest.raises(OSError):  # the port is taken by the running server
        with PolicyServer(policy, host="127.0.0.1", port=port).running():
            pass


_SLOW_SERVER = """
import sys, time, jax
from eqx_energy.serve import PolicyServer, ToyPolicy

class Slow(ToyPolicy):
    def infer(self, obs):
        print("inferring", flush=True)
        time.sleep(1.0)
        return super().infer(obs)

policy = Slow(state_dim=4, horizon=4, action_dim=3, width=16, correction_steps=2, key=jax.random.key(0))
PolicyServer(policy, port=int(sys.argv[1])).serve_forever()
print("stopped", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_request_in_flight_then_exits_0(policy, sig):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SERVER, str(free)], stdout=subprocess.PIPE, text=True)
    try:
        with PolicyClient("127.0.0.1", free, wait_s=60.0, retry_s=0.2) as client:
            result: dict = {}
            thread = threading.Thread(target=lambda: result.update(client.infer(_obs(0))))
            thread.start()
            assert proc.stdout.readline() == "inferring\n"  # the request is in flight (1 s of inference)
            proc.send_signal(sig)
            thread.join(TIMEOUT_S)
            np.testing.assert_array_equal(result["actions"], policy.infer(_obs(0))["actions"])
            with pytest.raises(ConnectionClosed) as closed:  # then the server says goodbye
                client.infer(_obs(1))
            assert closed.value.rcvd.code == 1001 and closed.value.rcvd.reason == "server shutting down"
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and out == "stopped\n"


def test_event_loop_stays_responsive_during_inference(policy):
    class Gated:
        """The toy policy, held at a gate so an inference is in flight while the test probes the server."""

        metadata = policy.metadata
        entered, release = threading.Event(), threading.Event()

        def infer(self, obs: dict) -> dict:
            self.entered.set()
            assert self.release.wait(TIMEOUT_S)
            return policy.infer(obs)

    gated = Gated()
    with PolicyServer(gated, host="127.0.0.1", port=0).running() as port:
        with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as busy:
            result: dict = {}
            thread = threading.Thread(target=lambda: result.update(busy.infer(_obs(0))))
            thread.start()
            assert gated.entered.wait(TIMEOUT_S)
            test_healthz(port)  # answered while the inference is blocked
            with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as newcomer:
                assert newcomer.metadata == policy.metadata
            gated.release.set()
            thread.join(TIMEOUT_S)
    np.testing.assert_array_equal(result["actions"], policy.infer(_obs(0))["actions"])


def test_binds_loopback_by_default_and_warns_when_exposed_without_key(policy, caplog):
    assert PolicyServer(policy).host == "127.0.0.1"
    caplog.set_level(logging.WARNING, logger="eqx_energy.serve.server")
    with PolicyServer(policy, port=0).running():
        pass
    assert "without an API key" not in caplog.text
    with PolicyServer(policy, host="0.0.0.0", port=0).running():
        pass
    assert "serving on 0.0.0.0 without an API key" in caplog.text
    caplog.clear()
    with PolicyServer(policy, host="0.0.0.0", port=0, api_key="k3y").running():
        pass
    assert "without an API key" not in caplog.text


API_KEY = "s3cret-Key_42"


@pytest.fixture(scope="module")
def keyed_port(policy):
    with PolicyServer(policy, port=0, api_key=API_KEY).running() as port:
        yield port


@pytest.mark.parametrize("headers", [None, {"Authorization": "Api-Key wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Api-Key {API_KEY}x"}])
def test_missing_or_wrong_api_key_gets_401_before_any_frame(keyed_port, headers):
    with pytest.raises(InvalidStatus) as refused:
        ws_client.connect(f"ws://127.0.0.1:{keyed_port}", additional_headers=headers, proxy=None,
                          open_timeout=TIMEOUT_S)
    assert refused.value.response.status_code == 401
    request = urllib.request.Request(f"http://127.0.0.1:{keyed_port}/healthz", headers=headers or {})
    with pytest.raises(urllib.error.HTTPError) as http_refused:
        _OPENER.open(request, timeout=TIMEOUT_S)
    assert http_refused.value.code == 401


def test_right_api_key_is_served_and_never_logged(policy, keyed_port, caplog):
    caplog.set_level(logging.DEBUG)  # websockets logs every request header at DEBUG
    with PolicyClient("127.0.0.1", keyed_port, api_key=API_KEY, wait_s=TIMEOUT_S) as client:
        assert API_KEY not in str(client.metadata)
        np.testing.assert_array_equal(client.infer(_obs(0))["actions"], policy.infer(_obs(0))["actions"])
    request = urllib.request.Request(f"http://127.0.0.1:{keyed_port}/healthz",
                                     headers={"Authorization": f"Api-Key {API_KEY}"})
    with _OPENER.open(request, timeout=TIMEOUT_S) as response:
        assert response.status == 200
    server_log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("eqx_energy.serve.server"))
    assert "< Authorization: <redacted>" in server_log  # the header was logged, without its value
    assert API_KEY not in server_log


def test_connection_cap_refuses_with_a_reason_and_frees_the_slot(policy):
    with PolicyServer(policy, port=0, max_connections=2).running() as port:
        with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as first, _raw(port) as second:
            second.recv(timeout=TIMEOUT_S)
            with _raw(port) as third, pytest.raises(ConnectionClosed) as refused:
                third.recv(timeout=TIMEOUT_S)
            assert refused.value.rcvd.code == 1013  # try again later
            assert "max_connections=2" in refused.value.rcvd.reason
            assert first.infer(_obs(0))["actions"].shape == (4, 3)
        _served_once_a_slot_frees(port)  # the server notices the two closes shortly after


def _served_once_a_slot_frees(port: int) -> float:
    """Connects until the server stops refusing (code 1013) and answers a request; returns the seconds waited."""
    start = time.monotonic()
    while True:
        try:
            with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as newcomer:
                assert newcomer.infer(_obs(1))["actions"].shape == (4, 3)
            return time.monotonic() - start
        except ConnectionClosed as refused:
            assert refused.rcvd.code == 1013 and time.monotonic() - start < TIMEOUT_S
            time.sleep(0.05)


class _Gated:
    """Wraps a policy and holds each inference at a gate, so a test can keep one in flight."""

    def __init__(self, policy):
        self.policy, self.metadata = policy, policy.metadata
        self.entered, self.release = threading.Event(), threading.Event()

    def infer(self, obs: dict) -> dict:
        self.entered.set()
        assert self.release.wait(TIMEOUT_S)
        return self.policy.infer(obs)


def test_full_inference_queue_is_a_busy_error(policy):
    gated = _Gated(policy)
    with PolicyServer(gated, port=0, max_pending=1).running() as port:
        with _raw(port) as busy, _raw(port) as other:
            busy.recv(timeout=TIMEOUT_S), other.recv(timeout=TIMEOUT_S)
            busy.send(wire.packb(_obs(0)))
            assert gated.entered.wait(TIMEOUT_S)
            other.send(wire.packb(_obs(1)))
            _assert_one_line_error(other.recv(timeout=TIMEOUT_S), "ServerBusy", r"max_pending=1\); retry shortly")
            gated.release.set()
            np.testing.assert_array_equal(wire.unpackb(busy.recv(timeout=TIMEOUT_S))["actions"],
                                          policy.infer(_obs(0))["actions"])
            other.send(wire.packb(_obs(1)))  # the retry is served
            assert wire.unpackb(other.recv(timeout=TIMEOUT_S))["actions"].shape == (4, 3)


def test_idle_connection_is_closed_with_a_reason(policy):
    with PolicyServer(policy, port=0, idle_timeout_s=0.3).running() as port, _raw(port) as ws:
        ws.recv(timeout=TIMEOUT_S)
        ws.send(wire.packb(_obs(0)))
        ws.recv(timeout=TIMEOUT_S)
        start = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT_S)
    assert 0.2 < time.monotonic() - start < 5.0
    assert closed.value.rcvd.code == 1000 and "idle_timeout_s" in closed.value.rcvd.reason


def test_peer_that_stops_reading_is_dropped_by_keepalive(policy):
    """A raw TCP peer completes the handshake and never reads again: it holds the only slot until
    the keepalive ping goes unanswered, then a newcomer is served."""
    with PolicyServer(policy, port=0, max_connections=1, keepalive_s=0.3).running() as port:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as stalled:
            stalled.sendall(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert stalled.recv(12) == b"HTTP/1.1 101"
            with _raw(port) as refused, pytest.raises(ConnectionClosed):
                refused.recv(timeout=TIMEOUT_S)
            # ping after keepalive_s, no pong within keepalive_s, no close reply within keepalive_s
            assert 2 * 0.3 < _served_once_a_slot_frees(port) < 10.0


def test_cli_binds_loopback_and_defaults_to_the_server_limits():
    import correct as correct_cli

    args = correct_cli._parser().parse_args(["serve", "--ckpt", "RUN"])
    assert args.host == "127.0.0.1" and args.api_key is None
    defaults = inspect.signature(PolicyServer).parameters
    for name in ("port", "max_connections", "max_pending", "max_queue", "max_size", "idle_timeout_s", "keepalive_s"):
        assert getattr(args, name) == defaults[name].default, name
