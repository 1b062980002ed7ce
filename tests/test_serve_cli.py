"""`correct.py serve` on the tiny trained run, as an outside client meets it: the API key from the
environment, 401 without it, the key in no output, SIGTERM -> exit 0."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import InvalidStatus

from eqx_energy.serve import PolicyClient

pytestmark = pytest.mark.slow  # trains a tiny run, then loads it in a server process
KEY = "cli-Key-7"
ROOT = Path(__file__).resolve().parents[1]


def test_serve_requires_the_environment_key_and_stops_on_sigterm(tiny_run):
    run_dir, _ = tiny_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, EQX_ENERGY_API_KEY=KEY)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "correct.py"), "serve", "--ckpt", str(run_dir), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with PolicyClient("127.0.0.1", port, api_key=KEY, wait_s=120.0, retry_s=0.5) as client:
            assert client.metadata["action_horizon"] == 4 and KEY not in str(client.metadata)
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(f"ws://127.0.0.1:{port}", proxy=None, open_timeout=10)
        assert refused.value.response.status_code == 401
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with pytest.raises(urllib.error.HTTPError, match="401"):
            opener.open(f"http://127.0.0.1:{port}/healthz", timeout=10)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert time.monotonic() - start < 30
    assert f"on 127.0.0.1:{port}" in out and "API key required" in out
    assert KEY not in out + err
