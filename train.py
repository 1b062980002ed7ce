"""Train the energy head (energy_only, joint or monitor mode) on a LeRobot dataset.

    python train.py --config libero_energy.yaml [--set key.sub=value ...] [--run-dir DIR] [--restart]

A bare config name resolves in configs/. A run dir with checkpoints is resumed from its latest
step (the data iterator included); --restart refuses an existing run instead. The effective config
is written to <run_dir>/config.yaml. Multi-host: set JAX_COORDINATOR_ADDRESS (or run under SLURM /
Open MPI) and jax.distributed is initialized before anything else.
"""

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config: a path, or a name in configs/ (e.g. demo)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.energy_lr=1e-4 (repeatable; validated and typed)",
    )
    parser.add_argument("--run-dir", help="where checkpoints, metrics and plots go (default: the config's run_dir)")
    parser.add_argument("--restart", action="store_true", help="refuse to reuse a run dir that has checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from eqx_energy.train.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from eqx_energy.checkpoints.run import CheckpointError
    from eqx_energy.train.config import ConfigError, TrainConfig, load_config  # ConfigError is a ValueError
    from eqx_energy.train.loop import run

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        run_dir = args.run_dir or cfg.run_dir
        if run_dir is None:
            raise ConfigError("no run dir: pass --run-dir DIR or set run_dir in the config")
        out = run(cfg, run_dir, restart=args.restart, progress=False if args.no_progress else None)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run saved in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
