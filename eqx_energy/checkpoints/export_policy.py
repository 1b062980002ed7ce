"""Write a trained run's policy as an openpi `<checkpoint>/params` directory.

    python -m eqx_energy.checkpoints.export_policy RUN [OUT]      (OUT default: RUN/policy_params)

A second run can then train an energy head on the frozen policy (`policy.checkpoint: OUT`, `train.mode:
energy_only`), as configs/metaworld_energy_select.yaml does, and openpi's own code can load it. The
policy is the run's EMA when it has one (`--no-ema`: the raw params). An existing OUT is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_policy(run_dir: str | Path, out: str | Path | None = None, *, use_ema: bool = True) -> Path:
    """The policy of `run_dir` (latest step) saved to `out` in openpi's layout; returns `out`."""
    from eqx_energy.checkpoints.load_run import load_run, resolve_run
    from eqx_energy.checkpoints.openpi import save_openpi_params

    out = resolve_run(run_dir)[0] / "policy_params" if out is None else Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another OUT or remove it first")
    run = load_run(run_dir, use_ema=use_ema)
    return save_openpi_params(run.model.policy, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run dir (latest step) or RUN/checkpoints/STEP")
    parser.add_argument("out", nargs="?", help="output params dir (default: RUN/policy_params)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw trained params, not their EMA")
    args = parser.parse_args(argv)
    from eqx_energy.checkpoints.run import CheckpointError

    try:
        out = export_policy(args.run, args.out, use_ema=not args.no_ema)
    except (ValueError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
