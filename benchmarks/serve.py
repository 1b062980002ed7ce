"""Policy server on loopback: requests/s and p50/p99 round-trip latency, with and without correction.

Each setting starts a `PolicyServer` on 127.0.0.1 (free port) in this process, connects `clients`
`PolicyClient`s that each send LIBERO-shaped observations (two 224x224x3 uint8 cameras, an 8-dim
state, a prompt) back to back, and stops after `--requests` timed requests per client or
`--seconds`, whichever comes first (after `--warmup` untimed requests per client, which compile).
Latency is the client's send -> reply time; "overhead" is that minus the server's `infer_ms`
(msgpack + websocket + queueing); the correction share is median `correction_ms` / median latency.
The policy is `ToyPolicy` (a small MLP, the same weights in both settings); `measure()` takes any
policy with openpi's `infer`/`metadata`, so a real policy drops in. The last line printed is JSON.

    python benchmarks/serve.py [--requests 200] [--seconds 20] [--clients 1,2] [--correction-steps 3]
"""

import argparse
import contextlib
import json
import threading
import time

import jax
import numpy as np

from eqx_energy.serve import PolicyClient, PolicyServer, ToyPolicy
from eqx_energy.serve.server import Policy


def libero_obs(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": "put the bowl on the plate",
    }


def _run_policies(ckpt: str, steps: int) -> tuple[dict, list[dict]]:
    """EnergyPolicy of a trained run with correction off / on, and 8 of its held-out frames as requests."""
    from eqx_energy.checkpoints.load_run import load_run
    from eqx_energy.correct import CorrectionConfig
    from eqx_energy.data.source import LeRobotSource
    from eqx_energy.serve.policy import EnergyPolicy, correction_from

    run = load_run(ckpt)
    cfg = run.cfg
    source = LeRobotSource(cfg.data.root, cfg.policy.model.action_horizon, split="holdout",
                           holdout_fraction=cfg.data.holdout_fraction, holdout_seed=cfg.data.holdout_seed)
    policies = {"off": EnergyPolicy(run, CorrectionConfig(steps=0)), "on": EnergyPolicy(run, correction_from(run, steps=steps))}
    keys = policies["off"].metadata["observation_keys"]  # the cameras, the state and "prompt"
    observations = [{k: source[i][k] for k in keys} for i in range(8)]
    return policies, observations


def measure(
    policy: Policy, *, clients: int, requests: int, seconds: float, warmup: int, observations: list[dict] | None = None
) -> dict:
    """Serve `policy` on loopback and drive it with `clients` concurrent clients; returns summary stats."""
    observations = observations or [libero_obs(i) for i in range(8)]
    ready = threading.Barrier(clients + 1, timeout=60)
    records: list[list[tuple[float, dict]]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def drive(c: int, port: int) -> None:
        try:
            with PolicyClient("127.0.0.1", port, wait_s=10.0) as client:
                for i in range(warmup):
                    client.infer(observations[i % len(observations)])
                ready.wait()
                deadline = time.monotonic() + seconds
                for i in range(requests):
                    if time.monotonic() > deadline:
                        break
                    start = time.perf_counter()
                    reply = client.infer(observations[i % len(observations)])
                    records[c].append((time.perf_counter() - start, reply))
        except BaseException as e:
            errors.append(e)
            ready.abort()

    with PolicyServer(policy, host="127.0.0.1", port=0).running() as port:
        threads = [threading.Thread(target=drive, args=(c, port)) for c in range(clients)]
        for t in threads:
            t.start()
        with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: its error is raised below
            ready.wait()
        start = time.perf_counter()
        for t in threads:
            t.join(seconds + 60)
        elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    done = [r for per_client in records for r in per_client]
    latency_ms = np.array([lat * 1000 for lat, _ in done])
    server_ms = np.array([reply["server_timing"]["infer_ms"] for _, reply in done])
    correction_ms = [r["policy_timing"]["correction_ms"] for _, r in done if "correction_ms" in r["policy_timing"]]
    stats = {
        "clients": clients,
        "requests": len(done),
        "requests_per_s": len(done) / elapsed,
        "p50_ms": float(np.percentile(latency_ms, 50)),
        "p99_ms": float(np.percentile(latency_ms, 99)),
        "server_infer_p50_ms": float(np.median(server_ms)),
        "overhead_p50_ms": float(np.median(latency_ms - server_ms)),
    }
    if correction_ms:
        stats["correction_p50_ms"] = float(np.median(correction_ms))
        stats["correction_share"] = stats["correction_p50_ms"] / stats["p50_ms"]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per client and setting")
    parser.add_argument("--seconds", type=float, default=20.0, help="time cap per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per client first")
    parser.add_argument("--clients", default="1,2", help="comma-separated client counts")
    parser.add_argument("--correction-steps", type=int, default=3)
    parser.add_argument("--ckpt", help="serve this trained run (e.g. runs/demo) instead of ToyPolicy; "
                        "observations are its held-out dataset frames")
    args = parser.parse_args()

    key = jax.random.key(0)
    policies, observations = _run_policies(args.ckpt, args.correction_steps) if args.ckpt else ({
        "off": ToyPolicy(horizon=10, action_dim=7, width=256, key=key),
        "on": ToyPolicy(horizon=10, action_dim=7, width=256, correction_steps=args.correction_steps, key=key),
    }, None)
    results = {}
    for clients in (int(c) for c in args.clients.split(",")):
        for name, policy in policies.items():
            stats = measure(policy, clients=clients, requests=args.requests, seconds=args.seconds, warmup=args.warmup,
                            observations=observations)
            results[f"correction_{name}_clients_{clients}"] = stats
            share = f", correction {stats['correction_share']:.0%} of latency" if "correction_share" in stats else ""
            print(
                f"correction {name:3s} clients {clients}: {stats['requests']} requests, "
                f"{stats['requests_per_s']:.1f} req/s, p50 {stats['p50_ms']:.2f} ms, p99 {stats['p99_ms']:.2f} ms, "
                f"server infer {stats['server_infer_p50_ms']:.2f} ms, overhead {stats['overhead_p50_ms']:.2f} ms{share}"
            )
        on, off = results[f"correction_on_clients_{clients}"], results[f"correction_off_clients_{clients}"]
        print(f"clients {clients}: p50 latency with / without correction = {on['p50_ms'] / off['p50_ms']:.2f}x")
    print(json.dumps({"benchmark": "serve", "policy": args.ckpt or "toy", "correction_steps": args.correction_steps,
                      "device": jax.devices()[0].platform, "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
