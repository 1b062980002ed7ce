"""The load-and-fault mix of benchmarks/serve_faults.py, small: every valid request answered correctly,
every invalid one with a one-line error (or close 1009 when oversize), dropped clients harmless, and
the server still serving afterwards."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_faults  # noqa: E402  (the benchmark directory is not a package)

from eqx_energy.serve import PolicyClient, PolicyServer  # noqa: E402

MAX_SIZE = 512 * 1024  # above the mix's 0.3 MB observations; keeps the oversize frames small


@pytest.fixture(scope="module")
def policy():
    return serve_faults.toy_policy()


def test_fault_mix_is_answered_and_the_server_survives(policy):
    with PolicyServer(policy, port=0, max_size=MAX_SIZE, max_connections=12, max_pending=6).running() as port:
        result = serve_faults.fault_mix(port, clients=3, requests=12, seed=0, policy=policy, max_size=MAX_SIZE,
                                        kinds=serve_faults.KINDS)
        with PolicyClient("127.0.0.1", port, wait_s=10.0) as client:  # still serving, correctly
            reply = client.infer(serve_faults.libero_obs(0))
    assert result["violations"] == []
    outcomes = result["outcomes"]
    assert sum(sum(c.values()) for c in outcomes.values()) == 36
    assert outcomes["valid"]["correct"] >= 5 and len(outcomes) >= 8, outcomes  # seed 0 draws a broad mix
    np.testing.assert_array_equal(reply["actions"], policy.infer(serve_faults.libero_obs(0))["actions"])
