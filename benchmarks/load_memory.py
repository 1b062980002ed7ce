"""Peak host RSS of loading a joint-mode run for inference, with and without the optimizer state.

Writes a joint-mode run dir (the tiny Pi0 with a `--vocab`-row token table, so the trainable tree is
mostly one large leaf; EMA on) as train.py writes it: config, tokenizer, norm stats and a step-1
checkpoint of params, AdamW state and EMA. Then, each in a fresh subprocess, the peak RSS (VmHWM of
/proc/self/status: Linux keeps ru_maxrss across fork + exec, so a child would report its parent's):
    imports        import load_run and build nothing: the runtime's own RSS
    load_run       `load_run(run)`: the model rebuilt, the EMA restored, nothing else read
    with_opt_state the restore load_run did before: params + optimizer state + EMA onto templates
                   from the optimizer built for the purpose
The last line printed is JSON (bytes of the trainable tree and each peak, in MiB).

    python benchmarks/load_memory.py [--vocab 1000000 | --quick]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine


def _child(kind: str, run_dir: str) -> None:
    """Measure one way of loading in this (fresh) process; prints {"peak_rss_mib": ...}."""
    from eqx_energy.checkpoints.load_run import load_run

    if kind == "load_run":
        load_run(run_dir)
    elif kind == "with_opt_state":
        import equinox as eqx

        from eqx_energy.checkpoints.run import RunCheckpoints, abstract
        from eqx_energy.train.config import TrainConfig, from_dict
        from eqx_energy.train.model import init_model
        from eqx_energy.train.optim import group_labels, make_optimizer
        from eqx_energy.train.sharding import make_mesh

        with RunCheckpoints(run_dir) as checkpoints:
            cfg = from_dict(TrainConfig, checkpoints.restore().config)
            trainable, _ = init_model(cfg, make_mesh())
            params = eqx.filter(trainable, eqx.is_inexact_array)
            optimizer = make_optimizer(cfg.optim, group_labels(params), total_steps=cfg.train.steps)
            checkpoints.restore(params=abstract(params), opt_state=eqx.filter_eval_shape(optimizer.init, params),
                                ema=abstract(params))
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    print(json.dumps({"peak_rss_mib": peak_kib / 1024}))


def _write_run(run_dir: Path, vocab: int) -> int:
    """A joint-mode run dir with a step-1 checkpoint; returns the trainable tree's bytes."""
    import equinox as eqx
    import jax
    import numpy as np

    from eqx_energy.checkpoints.run import RunCheckpoints
    from eqx_energy.data.norm_stats import NormStats, save_norm_stats
    from eqx_energy.energy import EnergyConfig
    from eqx_energy.policy.pi0 import Pi0Config
    from eqx_energy.policy.tokenizer import train_sentencepiece
    from eqx_energy.train.config import DataConfig, OptimConfig, PolicyConfig, TrainConfig, TrainLoopConfig, to_dict
    from eqx_energy.train.config import write_config
    from eqx_energy.train.inputs import NORM_STATS_FILE, TOKENIZER_FILE
    from eqx_energy.train.model import init_model
    from eqx_energy.train.optim import group_labels, make_optimizer
    from eqx_energy.train.sharding import make_mesh
    from eqx_energy.train.step import init_state

    cfg = TrainConfig(
        policy=PolicyConfig(model=Pi0Config.tiny(vocab_size=vocab), frozen_dtype=None),
        energy=EnergyConfig(context_dim=64, action_dim=4, hidden=32, num_heads=4, max_horizon=10),
        data=DataConfig(root="unused", action_dim=4),
        optim=OptimConfig(warmup_steps=1, ema_decay=0.99),
        train=TrainLoopConfig(mode="joint", steps=10),
    )
    write_config(cfg, run_dir / "config.yaml")
    train_sentencepiece(["pick up the block", "open the drawer"], run_dir / TOKENIZER_FILE, vocab_size=64)
    save_norm_stats({k: NormStats(mean=np.zeros(n), std=np.ones(n)) for k, n in (("state", 4), ("actions", 4))},
                    run_dir / NORM_STATS_FILE)
    trainable, _ = init_model(cfg, make_mesh())
    params = eqx.filter(trainable, eqx.is_inexact_array)
    state = init_state(trainable, make_optimizer(cfg.optim, group_labels(params), total_steps=cfg.train.steps), ema=True)
    with RunCheckpoints(run_dir) as checkpoints:
        checkpoints.save(1, params=state.params, opt_state=state.opt_state, ema=state.ema, skipped=0,
                         config=to_dict(cfg))
    return sum(x.nbytes for x in jax.tree.leaves(params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=1_000_000, help="token table rows (64 wide, f32)")
    parser.add_argument("--quick", action="store_true", help="a 100k-row table")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    vocab = 100_000 if args.quick else args.vocab
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        params_bytes = _write_run(run_dir, vocab)
        peaks = {}
        for kind in ("imports", "load_run", "with_opt_state"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(run_dir)], check=True,
                                 capture_output=True, text=True).stdout
            peaks[kind] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
    print(json.dumps({"benchmark": "load_memory", "vocab": vocab, "params_mib": params_bytes / 2**20,
                      "peak_rss_mib": peaks, **machine()}))


if __name__ == "__main__":
    main()
