"""A full-size Pi0 through the user's whole path on this CPU (issue 14): write, load, train, evaluate, serve.

Not part of the test suite. Each stage runs in its own process, and its peak RSS is read from
/proc/PID/status (VmHWM, polled until it exits: Linux keeps ru_maxrss across fork + exec, so a child's
own rusage would report its parent's):

    write  random weights for openpi's pi0 (libero_energy.yaml's model: gemma_2b + gemma_300m + SigLIP
           So400m/14, 3,238,048,528 parameters) drawn leaf by leaf in bfloat16 and written in openpi's
           layout by `save_openpi_params`; a LIBERO-format LeRobot dataset (two 256 px cameras, 8-dim
           state, 7-dim actions, `--episodes` x `--frames` frames) and a SentencePiece tokenizer
    load   `load_openpi_params(..., dtype=bfloat16)`: peak RSS against the tree's bytes (goal <= 1.3x),
           then the frozen prefix forward at batch `--batch` timed (the backbone's part of a step)
    train  `train.py --config libero_energy.yaml` with the paths, `--batch` and `--steps` overridden
    eval   `correct.py eval` on `--eval-frames` held-out frames
    serve  `correct.py serve` and one request from `PolicyClient`: latency, shape, finite

    python benchmarks/full_size.py [--workdir DIR] [--batch 2] [--steps 3]

The workdir keeps the checkpoint and dataset between runs (written only if missing; about 7 GB).
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import machine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "libero_energy.yaml"
PARAMS = 3_238_048_528  # openpi's pi0 (reference/openpi_pi0_tree.txt)
TASKS = ("put the bowl on the plate", "open the top drawer", "pick up the ketchup and place it in the basket")


def _status_kib(pid: int, field: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith(field + ":")), None)
    return int(line.split()[1]) if line else None


def _run_measured(args: list[str], *, log: Path, env: dict | None = None) -> dict:
    """Run `args` to completion; wall seconds and peak RSS (GiB, VmHWM polled every 0.2 s)."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _status_kib(proc.pid, "VmHWM") or 0)
            time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... exited {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": time.monotonic() - start, "peak_rss_gib": peak / 2**20}


def _child_write(work: str) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eqx_energy.checkpoints.openpi import save_openpi_params
    from eqx_energy.data.writer import write_lerobot_dataset
    from eqx_energy.policy.pi0 import Pi0
    from eqx_energy.policy.tokenizer import train_sentencepiece
    from eqx_energy.train.config import TrainConfig, load_config

    work_dir = Path(work)
    cfg = load_config(TrainConfig, CONFIG, []).policy.model
    template = eqx.filter_eval_shape(Pi0, cfg, key=jax.random.key(0))
    is_leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(template, is_leaf=is_leaf))
    if count != PARAMS:
        raise SystemExit(f"the libero_energy model has {count:,} parameters, expected openpi's {PARAMS:,}")
    leaves, treedef = jax.tree.flatten(template, is_leaf=is_leaf)
    rng = np.random.default_rng(0)
    # host arrays drawn one leaf at a time and kept in bf16: no float32 copy of the model ever exists
    draw = lambda shape: (0.02 * rng.standard_normal(shape, np.float32)).astype(jnp.bfloat16)  # noqa: E731
    pi0 = jax.tree.unflatten(treedef, [draw(x.shape) if is_leaf(x) else x for x in leaves])
    save_openpi_params(pi0, work_dir / "checkpoint" / "params")
    del pi0

    frames = int(os.environ["FULL_SIZE_FRAMES"])
    episodes = [({"image": rng.integers(0, 256, (frames, 256, 256, 3), dtype=np.uint8),
                  "wrist_image": rng.integers(0, 256, (frames, 256, 256, 3), dtype=np.uint8),
                  "state": rng.normal(size=(frames, 8)).astype(np.float32),
                  "actions": rng.normal(size=(frames, 7)).astype(np.float32)}, TASKS[i % len(TASKS)])
                for i in range(int(os.environ["FULL_SIZE_EPISODES"]))]
    write_lerobot_dataset(work_dir / "libero", episodes, fps=10, robot_type="panda", image_format="jpeg")
    train_sentencepiece(TASKS * 20, work_dir / "tokenizer.model")
    (work_dir / "written").write_text("ok")


def _child_load(work: str, batch: int) -> None:
    import equinox as eqx
    import jax
    import numpy as np

    from _common import policy_batch
    from eqx_energy.checkpoints.openpi import load_openpi_params
    from eqx_energy.policy.pi0 import Observation
    from eqx_energy.train.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, CONFIG, []).policy.model
    jax.numpy.zeros(1).block_until_ready()
    base = _status_kib(os.getpid(), "VmRSS")
    start = time.monotonic()
    pi0 = jax.block_until_ready(load_openpi_params(Path(work) / "checkpoint" / "params", cfg, dtype="bfloat16"))
    load_s = time.monotonic() - start
    peak = _status_kib(os.getpid(), "VmHWM")
    tree = sum(x.nbytes for x in jax.tree.leaves(pi0))
    obs = Observation.from_dict({k: v for k, v in policy_batch(cfg, batch, np.random.default_rng(0)).items() if k != "actions"})
    forward = eqx.filter_jit(lambda m, o: m.prefix_features(o)[0])
    start = time.monotonic()
    jax.block_until_ready(forward(pi0, obs))
    compile_s = time.monotonic() - start
    times = []
    for _ in range(2):
        start = time.monotonic()
        jax.block_until_ready(forward(pi0, obs))
        times.append(time.monotonic() - start)
    print(json.dumps({"base_gib": base / 2**20, "peak_gib": peak / 2**20, "tree_gib": tree / 2**30, "load_s": load_s,
                      "prefix_forward_s": min(times), "prefix_first_call_s": compile_s}))


def _serve_once(run_dir: Path, log: Path) -> dict:
    """`correct.py serve` on the run, one request: latency and what came back."""
    import numpy as np

    from eqx_energy.serve import PolicyClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "correct.py", "serve", "--ckpt", str(run_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _status_kib(proc.pid, "VmHWM") or 0)
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        with PolicyClient("127.0.0.1", port, wait_s=1800.0, retry_s=2.0) as client:
            ready_s = time.monotonic() - start
            rng = np.random.default_rng(1)
            obs = {}
            for key, spec in client.metadata["observation_schema"].items():
                if spec["dtype"] == "str":
                    obs[key] = TASKS[0]
                elif spec["dtype"] == "uint8":
                    obs[key] = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
                else:
                    obs[key] = rng.normal(size=spec["shape"]).astype(spec["dtype"])
            latencies, actions = [], None
            for _ in range(2):  # the first request compiles
                t = time.monotonic()
                actions = np.asarray(client.infer(obs)["actions"])
                latencies.append(time.monotonic() - t)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        watcher.join()
    return {"ready_s": ready_s, "first_request_s": latencies[0], "request_s": latencies[1],
            "actions_shape": list(actions.shape), "actions_finite": bool(np.isfinite(actions).all()),
            "peak_rss_gib": peak[0] / 2**20}


def _dir_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="keep the checkpoint and dataset here; default: a temporary folder")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--frames", type=int, default=12, help="frames per episode")
    parser.add_argument("--eval-frames", type=int, default=2)
    parser.add_argument("--stages", default="write,load,train,eval,serve")
    parser.add_argument("--child-write", metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--child-load", nargs=2, metavar=("WORKDIR", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_write:
        return _child_write(args.child_write)
    if args.child_load:
        return _child_load(args.child_load[0], int(args.child_load[1]))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).absolute()
        work.mkdir(parents=True, exist_ok=True)
        stages, result = args.stages.split(","), {}
        me = [sys.executable, str(Path(__file__).resolve())]
        if "write" in stages and not (work / "written").exists():
            env = dict(os.environ, FULL_SIZE_FRAMES=str(args.frames), FULL_SIZE_EPISODES=str(args.episodes))
            result["write"] = _run_measured([*me, "--child-write", str(work)], log=work / "write.log", env=env)
            result["write"]["checkpoint_gib"] = _dir_gib(work / "checkpoint" / "params")
            print("write", json.dumps(result["write"]), flush=True)
        if "load" in stages:
            result["load"] = _run_measured([*me, "--child-load", str(work), str(args.batch)], log=work / "load.log")
            result["load"] |= json.loads((work / "load.log").read_text().strip().splitlines()[-1])
            result["load"]["load_peak_over_tree"] = result["load"]["peak_gib"] / result["load"]["tree_gib"]
            print("load", json.dumps(result["load"]), flush=True)
        run_dir = work / "run"
        if "load" not in result and (work / "load.log").exists():  # measured by an earlier invocation
            last = (work / "load.log").read_text().strip().splitlines()[-1:]
            if last and last[0].startswith("{"):
                result["load"] = json.loads(last[0])
        if "train" in stages:
            overrides = {
                "policy.checkpoint": work / "checkpoint" / "params", "policy.tokenizer": work / "tokenizer.model",
                "data.root": work / "libero", "data.norm_stats": "null", "data.batch_size": args.batch,
                "data.holdout_fraction": 1 / args.episodes + 1e-3, "data.workers": 0, "train.steps": args.steps,
                "train.log_interval": 1, "train.checkpoint_interval": args.steps, "optim.warmup_steps": 1,
                "loss.chunk": args.batch,
            }
            sets = [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
            result["train"] = _run_measured([sys.executable, "train.py", "--config", str(CONFIG), "--run-dir", str(run_dir),
                                             "--new-run", "--no-progress", *sets], log=work / "train.log")
            metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            result["train"] |= {"s_per_step_after_first": [1 / m["steps_per_s"] for m in metrics[1:]],
                                "losses": [m["loss"] for m in metrics],
                                "checkpoint_gib": _dir_gib(run_dir / "checkpoints")}
            if "load" in result:
                s = min(result["train"]["s_per_step_after_first"], default=float("nan"))
                result["train"]["energy_share_of_step"] = 1 - result["load"]["prefix_forward_s"] / s
            print("train", json.dumps(result["train"]), flush=True)
        if "eval" in stages:
            # one setting per kind: at this size every prefix pass takes minutes on a CPU
            result["eval"] = _run_measured([sys.executable, "correct.py", "eval", "--ckpt", str(run_dir), "--frames",
                                            str(args.eval_frames), "--batch-size", str(args.eval_frames), "--sigmas", "0.3",
                                            "--alpha-sweep", "0.1", "--steps", "1", "--num-samples", "1,2",
                                            "--guide-scales", "1", "--out", str(work / "eval")], log=work / "eval.log")
            print("eval", json.dumps(result["eval"]), flush=True)
        if "serve" in stages:
            result["serve"] = _serve_once(run_dir, work / "serve.log")
            print("serve", json.dumps(result["serve"]), flush=True)
        print(json.dumps({"benchmark": "full_size", "params": PARAMS, "batch": args.batch, "results": result, **machine()}))


if __name__ == "__main__":
    main()
