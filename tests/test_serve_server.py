"""Policy server and client on loopback: metadata frame, round trips, errors, size limit, concurrency, /healthz.

One server (module fixture) serves every test, so the error tests also show that it keeps serving.
"""

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
from websockets.exceptions import ConnectionClosed

from eqx_energy.serve import PolicyClient, PolicyServer, ToyPolicy, wire

MAX_SIZE = 64 * 1024
TIMEOUT_S = 20.0  # every socket wait in these tests is bounded


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


@pytest.mark.parametrize(
    "message, error",
    [
        (b"\xc1", "ExtraData|Unpack|unpack|reserved"),  # 0xc1 is never used in msgpack
        ("not bytes", "got a text frame"),
        (wire.packb([1, 2, 3]), "must be a msgpack map"),
    ],
)
def test_malformed_message_is_reported_and_server_survives(port, message, error):
    with _raw(port) as ws:
        ws.recv(timeout=TIMEOUT_S)  # metadata
        ws.send(message)
        report = ws.recv(timeout=TIMEOUT_S)
        assert isinstance(report, str) and report.startswith("Traceback")
        assert any(e in report for e in error.split("|"))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT_S)
    assert closed.value.rcvd.code == 1011
    assert closed.value.rcvd.reason == "Internal server error. Traceback included in previous frame."
    with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as client:
        assert client.infer(_obs(1))["actions"].shape == (4, 3)


def test_policy_error_raises_in_client(port):
    with PolicyClient("127.0.0.1", port, wait_s=TIMEOUT_S) as client:
        bad = {k: v for k, v in _obs(0).items() if k != "observation/wrist_image"}
        expected = r"(?s)Error in inference server:\n.*lacks keys \['observation/wrist_image'\]"
        with pytest.raises(RuntimeError, match=expected):
            client.infer(bad)


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
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT_S) as response:
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


@pytest.mark.slow
def test_serve_forever_stops_on_ctrl_c():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    script = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # a background child ignores SIGINT
        "import jax; from eqx_energy.serve import PolicyServer, ToyPolicy\n"
        f"PolicyServer(ToyPolicy(key=jax.random.key(0)), host='127.0.0.1', port={free}).serve_forever()\n"
        "print('stopped')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while True:  # until the server answers its health check (bounded)
            try:
                with opener.open(f"http://127.0.0.1:{free}/healthz", timeout=TIMEOUT_S) as response:
                    assert response.read() == b"OK\n"
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and out.strip() == "stopped"


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
