"""CLI: python -m eqx_energy.sim.generate [--out data/generated/metaworld] [--tasks reach-v3,...] ...

Records Meta-World scripted-expert episodes (a fraction with noisy actions) as a LeRobot v2.1 dataset.
"""

import argparse
import json
import logging

from eqx_energy.sim.metaworld import GenerateConfig, generate_dataset


def main(argv: list[str] | None = None) -> dict:
    d = GenerateConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/generated/metaworld", help="dataset directory (gitignored by default)")
    p.add_argument("--tasks", default=",".join(d.tasks), help="comma-separated Meta-World v3 task names")
    p.add_argument("--episodes-per-task", type=int, default=d.episodes_per_task)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--cameras", default=",".join(d.cameras), help="two camera names: front,wrist")
    p.add_argument("--no-images", action="store_true", help="state-only episodes: no cameras rendered or stored")
    p.add_argument("--noisy-fraction", type=float, default=d.noisy_fraction)
    p.add_argument("--noise-std", type=float, default=d.noise_std)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    a = p.parse_args(argv)
    cameras = tuple(a.cameras.split(","))
    if len(cameras) != 2:
        p.error(f"--cameras needs exactly two names (front,wrist); got {a.cameras!r}")
    config = GenerateConfig(tasks=tuple(a.tasks.split(",")), episodes_per_task=a.episodes_per_task, seed=a.seed,
                            image_size=a.image_size, cameras=cameras, images=not a.no_images, noisy_fraction=a.noisy_fraction,
                            noise_std=a.noise_std, max_steps=a.max_steps)
    summary = generate_dataset(a.out, config, overwrite=a.overwrite)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
