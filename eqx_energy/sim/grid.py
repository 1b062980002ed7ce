"""The closed-loop grid behind `correct.py eval-sim`: every sigma x inference setting on the same episodes.

    settings = inference_settings(run, methods=["off", "select", "oracle"], num_samples=[1, 8], ...)
    runs = run_grid(run, settings, tasks, episodes, sigmas=[0.0, 0.3], ...)   # {"select N=8 sigma=0": EvalResult}
    write_paired(runs, baselines_for(runs), out)                               # paired.json / paired.md

Pairing: every setting runs the same episodes (env seed, variation, noise stream per episode, from
`evaluate`) with the same policy seed, and every method's candidate 0 is the same plain sample
(`energy_sampling`), so each setting is compared with "off" at its sigma episode by episode
(`sim.paired`: wins, losses, exact McNemar). Each setting's results carry the policy's ms per call.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eqx_energy._files import atomic_write
from eqx_energy.checkpoints.load_run import LoadedRun
from eqx_energy.policy.energy_sampling import METHODS, InferenceConfig
from eqx_energy.serve.client import PolicyClient
from eqx_energy.serve.policy import correction_from, inference_from
from eqx_energy.sim.evaluate import ExpertPolicy, evaluate
from eqx_energy.sim.paired import paired, paired_table
from eqx_energy.sim.policy_adapter import SimPolicy, client_policy_fn, needs_images
from eqx_energy.sim.report import EvalResult

BASELINE = "off"


@dataclasses.dataclass(frozen=True)
class Setting:
    """A named inference configuration of the grid (names are the rows of the report)."""

    name: str
    inference: InferenceConfig


def inference_settings(run: LoadedRun, methods: Sequence[str], num_samples: Sequence[int], *,
                       steps: Sequence[int], alphas: Sequence[float], clip_frac: float | None = None,
                       first_only: bool = False, margin: float | None = None, scales: Sequence[float | None] = (None,),
                       schedule: str | None = None, query: str | None = None) -> list[Setting]:
    """off once; gradient per steps x alpha (steps > 0; named "k=K alpha=A", as before methods existed);
    select, oracle per n; guided per n x scale. None knobs are the run's `inference` section's."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or any(n < 1 for n in num_samples):
        raise ValueError(f"eval-sim --method takes {list(METHODS)} and --num-samples n >= 1; got methods {list(methods)}, "
                         f"num_samples {list(num_samples)}")
    out = []
    for method in dict.fromkeys(methods):
        if method == "off":
            out.append(Setting("off", inference_from(run, "off")))
        elif method == "gradient":
            for k in (k for k in steps if k > 0):
                for a in alphas:
                    correction = correction_from(run, steps=k, alpha=a, clip_frac=clip_frac, first_only=first_only or None)
                    out.append(Setting(f"k={k} alpha={a:g}", inference_from(run, "gradient", correction=correction)))
        elif method == "guided":
            for n in num_samples:
                for scale in scales:
                    inference = inference_from(run, "guided", num_samples=n, margin=margin, guide_scale=scale,
                                               schedule=schedule, query=query)
                    out.append(Setting(f"guided N={n} lambda={float(inference.guidance.scale):g}", inference))
        else:
            out += [Setting(f"{method} N={n}", inference_from(run, method, num_samples=n, margin=margin)) for n in num_samples]
    return out


def run_grid(run: LoadedRun, settings: Sequence[Setting], tasks: Sequence[str], episodes: int, sigmas: Sequence[float],
             *, policy_seed: int = 0, log: bool = True, **common: Any) -> dict[str, EvalResult]:
    """`evaluate` of every sigma x setting in process (noise before the energy acts); `common` goes to evaluate."""
    runs = {}
    model = run.cfg.policy.model
    for sigma in sigmas:
        for setting in settings:
            oracle = ExpertPolicy(tasks, horizon=model.action_horizon) if setting.inference.method == "oracle" else None
            correction = setting.inference.correction or correction_from(run, steps=0)  # what the metadata reports
            adapter = SimPolicy(run, correction, seed=policy_seed, inference=setting.inference, oracle=oracle)
            start = time.perf_counter()
            name = f"{setting.name} sigma={sigma:g}"
            runs[name] = result = evaluate(adapter, tasks, episodes, noise_sigma=sigma, act=adapter.act,
                                           render_images=run.cfg.data.image_key is not None, **common)
            result.settings.update(inference={"method": setting.inference.method, "num_samples": setting.inference.num_samples},
                                   correction=adapter.policy.metadata["correction"], run=str(run.run_dir), step=run.step,
                                   wall_s=time.perf_counter() - start, infer_ms_per_call=adapter.infer_ms / max(adapter.calls, 1))
            if log:
                print(f"{name}: " + ", ".join(f"{r.task} {r.success_rate:.2f}" for r in result.tasks), flush=True)
    return runs


def served_grid(client: PolicyClient, tasks: Sequence[str], episodes: int, sigmas: Sequence[float],
                **common: Any) -> dict[str, EvalResult]:
    """The same episodes through a PolicyServer (its own method; noise after it, `noise_after_policy`)."""
    render = needs_images(client.metadata)
    return {f"served sigma={sigma:g}": evaluate(client_policy_fn(client), tasks, episodes, noise_sigma=sigma,
                                                render_images=render, **common)
            for sigma in sigmas}


def baselines_for(runs: Mapping[str, EvalResult]) -> dict[str, str]:
    """Each run -> the "off" run at its sigma (the name's ` sigma=` suffix), where the grid has one."""
    out = {}
    for name in runs:
        base = f"{BASELINE} {name.rpartition(' ')[2]}"
        if base in runs:
            out[name] = base
    return out


def write_paired(runs: Mapping[str, EvalResult], baselines: Mapping[str, str], out_dir: str | Path) -> dict[str, Path]:
    """paired.json (wins, losses, McNemar p overall and per task, against each run's baseline) and paired.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comparisons = {name: {"baseline": base, **paired(runs[base], runs[name])}
                   for name, base in baselines.items() if base != name}
    paths = {"paired_json": out / "paired.json", "paired_markdown": out / "paired.md"}
    atomic_write(paths["paired_json"], json.dumps(comparisons, indent=1) + "\n")
    atomic_write(paths["paired_markdown"], paired_table(runs, baselines))
    return paths
