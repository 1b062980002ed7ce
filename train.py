"""Train the energy head (energy_only, joint or monitor mode) on a LeRobot dataset.

    python train.py --config libero_energy.yaml [--set key.sub=value ...] [--run-dir DIR] [--new-run]
                    [--allow-config-change]

A bare config name resolves in configs/. A run dir with checkpoints is resumed from its latest
step (the data iterator included); --new-run refuses an existing run instead. Resuming with a config
that differs from the one saved in the latest checkpoint is refused with the changed keys unless
--allow-config-change (the change is then appended to <run_dir>/config_changes.jsonl). Each
checkpoint saves its config (what correct.py loads); <run_dir>/config.yaml is a readable copy of the
latest invocation's. Multi-host: set JAX_COORDINATOR_ADDRESS (or run under SLURM /
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
    parser.add_argument("--new-run", action="store_true", help="refuse a run dir that has checkpoints (default: resume it)")
    parser.add_argument(
        "--allow-config-change", action="store_true",
        help="resume even though the config differs from the checkpoint's (logged in config_changes.jsonl)",
    )
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
        out = run(cfg, run_dir, new_run=args.new_run, allow_config_change=args.allow_config_change,
                  progress=False if args.no_progress else None)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run saved in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
