"""Policy server under load and faults: loopback only, bounded (stops by itself), exit 1 on any violation.

The server (`PolicyServer` around `ToyPolicy`, 3 correction steps) runs in a child process, so its
memory is its own and a crash shows as a dead process. `--clients` threads each send `--requests`
requests, each of a kind drawn (seeded) from:

    valid         a LIBERO-shaped observation          -> the actions ToyPolicy computes in this process
    garbage       0xc1 + random bytes (never msgpack)   -> a one-line error reply "Type: message [request id]"
    truncated     a valid frame cut short               -> error reply
    object_dtype  an __ndarray__ of dtype "|O"          -> error reply (numpy would read raw pointers)
    length        __ndarray__ data shorter than its shape needs -> error reply
    expansion     a ~max_size msgpack array of empty maps (one byte each, ~100 decoded) -> error reply
    text          a text frame                          -> error reply
    wrong_schema  a 3-dim state or a missing camera     -> error reply
    nan           a NaN in the state                    -> error reply
    oversize      a message over max_size               -> close 1009; the client reconnects
    slow_reader   3 valid requests pipelined, replies read 0.2 s later -> 3 correct replies, in order
    disconnect    a valid request, or half a frame, then the TCP connection dropped without a close

`--rounds` rounds of the mix run back to back; the server's RSS (VmRSS) is read after warm-up and
after each round, and its peak (VmHWM) at the end, so a leak shows as growth from round to round.
Then a health check and one valid request must still succeed, and SIGTERM must stop the server
with exit code 0. The last line printed is JSON.

    python benchmarks/serve_faults.py [--clients 8] [--requests 100] [--rounds 2] [--without expansion] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

from _common import emit, machine
from eqx_energy.serve import PolicyServer, ToyPolicy, wire
from serve import libero_obs

KINDS = {  # kind -> relative frequency
    "valid": 8, "garbage": 1, "truncated": 1, "object_dtype": 1, "length": 1, "expansion": 1, "text": 1,
    "wrong_schema": 1, "nan": 1, "oversize": 1, "slow_reader": 1, "disconnect": 1,
}
MAX_SIZE = 2**20  # the server's message cap here: LIBERO observations are 0.3 MB
ERROR_REPLY = re.compile(r"\w+: [^\n]* \[request [0-9a-f]{12}\]")
TIMEOUT_S = 30.0


def toy_policy() -> ToyPolicy:
    return ToyPolicy(state_dim=8, horizon=10, action_dim=7, width=64, correction_steps=3, key=jax.random.key(0))


def _connect(port: int, stack: contextlib.ExitStack) -> ws_client.ClientConnection:
    ws = stack.enter_context(ws_client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None,
                                               proxy=None, open_timeout=TIMEOUT_S))
    ws.recv(timeout=TIMEOUT_S)  # metadata
    return ws


def _crafted_array(obs: dict, dtype: str, data: bytes) -> bytes:
    """A valid observation whose state is a hand-written __ndarray__ map (packed by msgpack directly)."""
    import msgpack

    state = {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": [8]}
    return msgpack.packb({**{k: v for k, v in obs.items() if k != "observation/state"}, "observation/state": state},
                         default=wire.pack_array)


class _Client:
    """One client thread's connection and tallies; `request(kind)` sends one request of that kind."""

    def __init__(self, port: int, observations: list[dict], expected: list[np.ndarray], seed: int, max_size: int):
        self.port, self.observations, self.expected, self.max_size = port, observations, expected, max_size
        self.rng = np.random.default_rng(seed)
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.latencies_ms: list[float] = []
        self._stack = contextlib.ExitStack()  # websockets wants its connections used as context managers
        self.ws = _connect(port, self._stack)

    def _reconnect(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.ws = _connect(self.port, self._stack)

    def _valid_reply(self, reply: object, i: int) -> bool:
        if not isinstance(reply, bytes):
            return False
        actions = wire.unpackb(reply).get("actions")
        return isinstance(actions, np.ndarray) and np.allclose(actions, self.expected[i], rtol=1e-6, atol=1e-6)

    def _expect_error(self, frame: bytes | str) -> str:
        self.ws.send(frame)
        reply = self.ws.recv(timeout=TIMEOUT_S)
        if isinstance(reply, str) and ERROR_REPLY.fullmatch(reply):
            return "error reply"
        return f"unexpected: {reply!r:.80}"

    def request(self, kind: str) -> str:
        i = int(self.rng.integers(len(self.observations)))
        obs = self.observations[i]
        frame = wire.packb(obs)
        if kind == "valid":
            start = time.perf_counter()
            self.ws.send(frame)
            reply = self.ws.recv(timeout=TIMEOUT_S)
            self.latencies_ms.append((time.perf_counter() - start) * 1000)
            return "correct" if self._valid_reply(reply, i) else f"wrong: {reply!r:.80}"
        if kind == "slow_reader":
            picks = [int(j) for j in self.rng.integers(len(self.observations), size=3)]
            for j in picks:
                self.ws.send(wire.packb(self.observations[j]))
            time.sleep(0.2)
            ok = all(self._valid_reply(self.ws.recv(timeout=TIMEOUT_S), j) for j in picks)
            return "3 correct" if ok else "wrong"
        if kind == "oversize":
            big = dict(obs, **{"observation/image": np.zeros((self.max_size // 3 + 1, 3), np.uint8)})
            try:  # the server may close while the message is still going out
                self.ws.send(wire.packb(big))
                self.ws.recv(timeout=TIMEOUT_S)
                return "answered"
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
                self._reconnect()
                return f"closed {code}"
        if kind == "disconnect":
            sock = self.ws.socket
            if self.rng.random() < 0.5:
                self.ws.send(frame)
            else:  # a masked binary frame header announcing 64 KiB, then a part of it
                sock.sendall(b"\x82\xfe\xff\xff" + bytes(4) + frame[:100])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, no close frame
            sock.shutdown(socket.SHUT_RDWR)
            self._reconnect()
            return "dropped"
        if kind == "garbage":
            return self._expect_error(b"\xc1" + self.rng.bytes(int(self.rng.integers(0, 200))))
        if kind == "truncated":
            return self._expect_error(frame[: int(self.rng.integers(1, len(frame)))])
        if kind == "object_dtype":
            return self._expect_error(_crafted_array(obs, "|O", struct.pack("<8Q", *range(8))))
        if kind == "length":
            return self._expect_error(_crafted_array(obs, "<f4", bytes(8 * 4 - 1)))
        if kind == "expansion":
            count = self.max_size - 64
            return self._expect_error(b"\xdd" + struct.pack(">I", count) + b"\x80" * count)
        if kind == "text":
            return self._expect_error("hello")
        if kind == "wrong_schema":
            bad = dict(obs, **{"observation/state": np.zeros(3)}) if self.rng.random() < 0.5 else \
                {k: v for k, v in obs.items() if k != "observation/wrist_image"}
            return self._expect_error(wire.packb(bad))
        if kind == "nan":
            state = np.array(obs["observation/state"])
            state[int(self.rng.integers(8))] = np.nan
            return self._expect_error(wire.packb(dict(obs, **{"observation/state": state})))
        raise ValueError(f"unknown request kind {kind!r}; known: {sorted(KINDS)}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()


EXPECTED = {"valid": {"correct"}, "slow_reader": {"3 correct"}, "oversize": {"closed 1009"}, "disconnect": {"dropped"}}


def fault_mix(
    port: int, *, clients: int, requests: int, seed: int, policy: ToyPolicy, max_size: int = MAX_SIZE,
    kinds: dict[str, int] = KINDS,
) -> dict:
    """Drive the server on `port` (whose message cap is `max_size`) with `clients` threads x `requests`
    requests of `kinds` (kind -> relative frequency); returns the tallies:
    {"outcomes": {kind: {outcome: n}}, "violations": [...], "latency_ms": [...], "seconds"}."""
    observations = [libero_obs(i) for i in range(8)]
    expected = [policy.infer(o)["actions"] for o in observations]
    names, weights = list(kinds), np.array(list(kinds.values()), float)
    results: list[_Client] = []
    failures: list[str] = []

    def drive(c: int) -> None:
        try:
            client = _Client(port, observations, expected, seed=seed * 1000 + c, max_size=max_size)
            results.append(client)
            for _ in range(requests):
                kind = names[client.rng.choice(len(names), p=weights / weights.sum())]
                client.outcomes[kind, client.request(kind)] += 1
            client.close()
        except Exception as e:
            failures.append(f"client {c}: {type(e).__name__}: {e}")

    start = time.monotonic()
    threads = [threading.Thread(target=drive, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes: dict[str, Counter] = {}
    for client in results:
        for (kind, outcome), n in client.outcomes.items():
            outcomes.setdefault(kind, Counter())[outcome] += n
    violations = failures + [
        f"{kind}: {n} x {outcome}" for kind, counts in outcomes.items() for outcome, n in counts.items()
        if outcome not in EXPECTED.get(kind, {"error reply"})
    ]
    latency = [ms for client in results for ms in client.latencies_ms]
    return {"outcomes": {k: dict(v) for k, v in sorted(outcomes.items())}, "violations": violations,
            "latency_ms": latency, "seconds": time.monotonic() - start}


def _rss_mib(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def _serve(port: int, clients: int) -> None:
    """The child process: ToyPolicy behind a PolicyServer with room for every client of the mix."""
    server = PolicyServer(toy_policy(), port=port, max_size=MAX_SIZE, max_connections=4 * clients,
                          max_pending=2 * clients)
    server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100, help="requests per client and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the mix (RSS is read after each)")
    parser.add_argument("--without", default="", help="comma-separated kinds to leave out, e.g. expansion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args.serve, args.clients)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w", prefix="serve_faults_server_", suffix=".log", delete=False)
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--clients", str(args.clients)],
                             stderr=log)
    policy = toy_policy()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 120
        while True:  # until the child answers its health check (bounded)
            try:
                opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline or child.poll() is not None:
                    raise RuntimeError("the server child did not come up") from None
                time.sleep(0.2)
        warm = fault_mix(port, clients=1, requests=10, seed=args.seed + 99, policy=policy)  # compiles
        rss = {"after warm-up": _rss_mib(child.pid)}
        kinds = {kind: n for kind, n in KINDS.items() if kind not in args.without.split(",")}
        rounds = []
        for r in range(args.rounds):
            rounds.append(fault_mix(port, clients=args.clients, requests=args.requests, seed=args.seed + r,
                                    policy=policy, kinds=kinds))
            rss[f"after round {r + 1}"] = _rss_mib(child.pid)
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            alive = response.status == 200 and child.poll() is None
        survivor = fault_mix(port, clients=1, requests=1, seed=args.seed + 7, policy=policy)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
    violations = warm["violations"] + [v for r in rounds for v in r["violations"]] + survivor["violations"]
    if not alive:
        violations.append("the server did not answer its health check after the mix")
    if code != 0:
        violations.append(f"the server exited with code {code} on SIGTERM")
    latency = np.array([ms for r in rounds for ms in r["latency_ms"]])
    outcomes: dict[str, Counter] = {}
    for r in rounds:
        for kind, counts in r["outcomes"].items():
            outcomes.setdefault(kind, Counter()).update(counts)
    total = sum(sum(c.values()) for c in outcomes.values())
    print(f"{args.clients} clients x {args.requests} requests x {args.rounds} rounds = {total} requests "
          f"in {sum(r['seconds'] for r in rounds):.1f} s")
    for kind, counts in sorted(outcomes.items()):
        print(f"  {kind:13s} " + ", ".join(f"{n} {outcome}" for outcome, n in counts.items()))
    print(f"valid round trip: p50 {np.percentile(latency, 50):.2f} ms, p99 {np.percentile(latency, 99):.2f} ms "
          f"(n={latency.size})")
    print("server RSS MiB: " + ", ".join(f"{k} {v['VmRSS']:.0f}" for k, v in rss.items())
          + f"; peak {rss[f'after round {args.rounds}']['VmHWM']:.0f}")
    print("violations: " + ("; ".join(violations) if violations else "none") + f"; SIGTERM exit code {code}; "
          f"server log (a traceback per error): {log.name}")
    emit({"benchmark": "serve_faults", "clients": args.clients, "requests": args.requests, "rounds": args.rounds,
          "without": args.without, "total": total,
          "outcomes": {k: dict(v) for k, v in outcomes.items()},
          "p50_ms": float(np.percentile(latency, 50)), "p99_ms": float(np.percentile(latency, 99)),
          "rss_mib": rss, "exit_code": code, "violations": violations, "machine": machine()})
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
