"""Offline evaluation of a run's energy head on held-out frames (`python correct.py eval`).

On N held-out frames (expert chunk a*, prefix features c of the trained policy), in the model's
normalized action space, first `action_dim` dims:

    ranking      E(c, a*) vs E(c, a~) for a~ = a* + sigma N(0, I) (per sigma), a* with its steps
                 shuffled, and other frames' chunks (a*_{i+1}); accuracy = P_i[E(a*_i) < E(a~_i)],
                 ROC AUC = P_{i,j}[E(a~_j) > E(a*_i)] (+ half the ties), lower energy = positive
    perturbed    a~ = a* + sigma_c N(0, I) corrected for each (alpha, steps): MSE(a, a*) before/after,
                 mean energy per correction step, ||a_corr - a~||, fraction of steps clipped
    policy       a_0 = policy.sample_actions (prefix features from the same pass), then `correct`:
                 what `sample_actions_with_energy_correction` composes; energy before/after,
                 ||a_corr - a_0||, MSE to a* before/after
    candidates   n policy samples per frame (candidate 0 = a_0; candidate i from key split(key, n)[i],
                 so the first n of max(n) are the n-sample draw): ranking of a* against them
                 (`policy_samples` in ranking), and per n the MSE to a* of the plain sample, the
                 lowest-energy candidate (eqx_energy.select), the nearest one (the oracle), top-1
                 agreement with the oracle and the mean Spearman correlation of E with ||a - a*||²;
                 guided sampling (eqx_energy.policy.energy_sampling, lambda = scale (1 - t), then
                 selection) per guidance scale and n

MSEs average over valid chunk steps (frames past an episode's end are excluded).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float
from tqdm.auto import tqdm

from eqx_energy import losses
from eqx_energy.checkpoints.load_run import LoadedRun
from eqx_energy.correct import CorrectionConfig, correct, energy_and_grad
from eqx_energy.data.source import LeRobotSource
from eqx_energy.data.transforms import Compose
from eqx_energy.policy.energy_sampling import GuidanceConfig, InferenceConfig, infer
from eqx_energy.policy.pi0 import Observation
from eqx_energy.select import select
from eqx_energy.train.inputs import model_inputs


class DatasetMismatch(ValueError):
    """The evaluation dataset does not fit the run (action/state dims, cameras, no held-out frames)."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    frames: int = 64  # held-out frames evaluated (spread evenly over the split)
    batch_size: int = 16
    sigmas: tuple[float, ...] = (0.1, 0.3, 1.0)  # ranking: gaussian perturbation scales
    correct_sigma: float = 0.3  # the perturbation that correction has to undo
    alphas: tuple[float, ...] = (0.1,)
    steps: tuple[int, ...] = (3,)
    clip_frac: float = 0.2
    first_only: bool = False
    num_samples: tuple[int, ...] = (1, 2, 4, 8)  # candidates per frame for selection and guidance
    guide_scales: tuple[float, ...] = (0.3, 1.0)  # guided sampling's lambda scale
    seed: int = 0


def check_dataset(run: LoadedRun, source: LeRobotSource) -> None:
    """Raise DatasetMismatch naming what differs between the dataset and the run's config."""
    features, data = source.info["features"], run.cfg.data
    problems = []
    action_shape = features.get(source.action_key, {}).get("shape")
    if action_shape != [data.action_dim]:
        problems.append(f"actions have shape {action_shape}, the run expects [{data.action_dim}]")
    for key in (data.image_key, data.wrist_key, data.state_key):
        if key is not None and key not in features:
            problems.append(f"no feature {key!r} (features: {sorted(features)})")
    state_shape = features.get(data.state_key, {}).get("shape", [0])
    if state_shape and state_shape[0] > run.cfg.policy.model.action_dim:
        problems.append(f"state has {state_shape[0]} dims, more than the model's {run.cfg.policy.model.action_dim}")
    if len(source) == 0:
        problems.append(f"the {source.split!r} split has no frames (holdout_fraction={source.holdout_fraction})")
    if problems:
        raise DatasetMismatch(f"dataset {source.root} does not match run {run.run_dir}: " + "; ".join(problems))


def _stack(examples: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: np.stack(xs), *examples)


def load_frames(run: LoadedRun, source: LeRobotSource, n: int) -> list[dict]:
    """n frames spread evenly over the split, in the model's layout (+ `action_valid`), as batches of one."""
    check_dataset(run, source)
    inputs = Compose((*run.transforms.inputs, model_inputs))
    picks = np.unique(np.linspace(0, len(source) - 1, min(n, len(source))).round().astype(int))
    frames = []
    for i in tqdm(picks, desc="frames", leave=False):
        raw = source[int(i)]
        frames.append({**inputs(raw), "action_valid": raw["action_valid"]})
    return frames


def _mse(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    per_step = np.mean(np.square(a - b), axis=-1)
    return float(np.sum(per_step * valid) / max(np.sum(valid), 1))


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P[E_neg > E_pos] + 0.5 P[tie] over all pairs (lower energy = more expert-like)."""
    diff = negative[None, :] - positive[:, None]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def _energies(energy, context, actions, mask) -> np.ndarray:
    return np.asarray(energy_and_grad(energy, context, actions, mask)[0])


@functools.partial(jax.jit, static_argnames="sigmas")
def _negatives(key, expert: Float[Array, "b h a"], sigmas: tuple[float, ...]) -> dict[str, Array]:
    """Negative chunks by name, as one program (run eagerly, each random op would compile on its own)."""
    noise_key, shuffle_key = jax.random.split(key)
    gauss = losses.gaussian_negatives(noise_key, expert, jnp.asarray(sigmas, jnp.float32))
    out = {f"gauss_{s:g}": gauss[:, k] for k, s in enumerate(sigmas)}
    out["shuffle"] = losses.shuffle_negatives(shuffle_key, expert)[:, 0]
    if expert.shape[0] > 1:
        out["other_chunk"] = losses.swap_negatives(expert)[:, 0]
    return out


def evaluate(run: LoadedRun, frames: list[dict], settings: EvalSettings) -> dict[str, Any]:
    """The report dict (JSON-ready): ranking, perturbed-correction and policy-correction results."""
    policy, energy = run.model.policy, run.model.energy
    action_dim = energy.action_dim
    grid = list(itertools.product(settings.steps, settings.alphas))
    key = jax.random.key(settings.seed)
    acc: dict[str, list] = {"expert": [], "neg": {}, "pert": {}, "policy": {}, "valid": []}
    batches = [frames[i : i + settings.batch_size] for i in range(0, len(frames), settings.batch_size)]
    for index, batch in enumerate(tqdm(batches, desc="evaluate")):
        data = _stack(batch)
        valid: Bool[np.ndarray, "b h"] = data.pop("action_valid")
        expert_padded = np.asarray(data.pop("actions"), np.float32)
        expert = expert_padded[..., :action_dim]
        obs = Observation.from_dict(data)
        neg_key, pert_key, sample_key = jax.random.split(jax.random.fold_in(key, index), 3)
        candidates, context, mask = policy.sample_actions(
            sample_key, obs, run.cfg.policy.sample_steps, num_samples=max(settings.num_samples)
        )
        sampled = candidates[:, 0]  # the plain sample: candidate 0 of every n
        acc["valid"].append(valid)
        expert_on_device = jnp.asarray(expert)
        acc["expert"].append((expert, _energies(energy, context, expert_on_device, mask)))
        for name, neg in _negatives(neg_key, expert_on_device, tuple(settings.sigmas)).items():
            acc["neg"].setdefault(name, []).append(_energies(energy, context, neg, mask))
        noise = settings.correct_sigma * np.asarray(jax.random.normal(pert_key, expert.shape))
        perturbed = expert_padded.copy()
        perturbed[..., :action_dim] += noise
        _candidate_results(acc, run, obs, sample_key, (candidates, context, mask), settings)
        for steps, alpha in grid:
            cfg = CorrectionConfig(steps=steps, alpha=alpha, clip_frac=settings.clip_frac, first_only=settings.first_only)
            for name, start in (("pert", perturbed), ("policy", sampled)):
                out, trace = correct(energy, context, jnp.asarray(start), mask, cfg)
                acc[name].setdefault((steps, alpha), []).append(
                    (np.asarray(start[..., :action_dim]), np.asarray(out[..., :action_dim]),
                     np.asarray(trace.energy), np.asarray(trace.clipped))
                )
    return _summarize(acc, grid)


def _candidate_results(acc: dict, run: LoadedRun, obs: Observation, key, drawn: tuple, settings: EvalSettings):
    """Per n: the energies of the `drawn` (candidates, context, mask) from `key` (the first n of them
    are the n-sample draw) and the selected chunk; per (guidance scale, n): the guided-then-selected
    chunk from the same key. Appended to `acc`."""
    policy, energy = run.model.policy, run.model.energy
    action_dim, steps = energy.action_dim, run.cfg.policy.sample_steps
    candidates, context, mask = drawn
    selections = {n: select(energy, context, candidates[:, :n], mask) for n in settings.num_samples}
    # every candidate's energy: the trace of the largest n, which draws them all
    acc.setdefault("sample_energies", []).append(np.asarray(selections[candidates.shape[1]][1].energies))
    acc.setdefault("samples", []).append(np.asarray(candidates[..., :action_dim]))
    for n, (chosen, _) in selections.items():
        acc.setdefault("selected", {}).setdefault(n, []).append(np.asarray(chosen[..., :action_dim]))
    query = "x_t" if energy.config.time_conditioning else "a_hat"
    for scale, n in itertools.product(settings.guide_scales, settings.num_samples):
        config = InferenceConfig(method="guided", num_samples=n, guidance=GuidanceConfig(scale=scale, query=query))
        guided, _ = infer(policy, energy, key, obs, config, steps)
        acc.setdefault("guided", {}).setdefault((scale, n), []).append(np.asarray(guided[..., :action_dim]))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over rows of the rank correlation of x and y (b n), n >= 2."""
    rx, ry = np.argsort(np.argsort(x, axis=1), axis=1), np.argsort(np.argsort(y, axis=1), axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    return float(np.mean(np.sum(rx * ry, axis=1) / np.sqrt(np.sum(rx**2, axis=1) * np.sum(ry**2, axis=1))))


def _summarize_candidates(acc: dict, expert: np.ndarray, e_expert: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    """The `selection` and `guided` report sections (module doc)."""
    energies = np.concatenate(acc["sample_energies"])
    # each candidate's squared error summed over the valid steps (mean over dims): _mse's numerator
    per_step = np.mean(np.square(np.concatenate(acc["samples"]) - expert[:, None]), axis=-1)
    distances = np.sum(per_step * valid[:, None], axis=-1)
    plain = float(np.sum(distances[:, 0]) / max(np.sum(valid), 1))  # candidate 0, the plain sample
    rows = []
    for n, parts in acc["selected"].items():
        e, d = energies[:, :n], distances[:, :n]
        nearest = d.argmin(axis=1)
        rows.append({
            "n": n,
            "mse_plain": plain,
            "mse_selected": _mse(np.concatenate(parts), expert, valid),
            "mse_oracle": float(np.sum(d[np.arange(len(d)), nearest]) / max(np.sum(valid), 1)),
            "top1_agreement": float(np.mean(e.argmin(axis=1) == nearest)),
            "rank_corr": _spearman(e, d) if n > 1 else None,
        })
    guided = [
        {"scale": scale, "n": n, "mse_guided": _mse(np.concatenate(parts), expert, valid)}
        for (scale, n), parts in acc["guided"].items()
    ]
    ranking = {
        "accuracy": float(np.mean(e_expert[:, None] < energies)),
        "auc": roc_auc(e_expert, energies.ravel()),
        "e_expert": float(e_expert.mean()),
        "e_negative": float(energies.mean()),
    }
    return {"ranking": ranking, "selection": rows, "guided": guided}


def _summarize(acc: dict, grid: list[tuple[int, float]]) -> dict[str, Any]:
    valid = np.concatenate(acc["valid"])
    expert = np.concatenate([a for a, _ in acc["expert"]])
    e_expert = np.concatenate([e for _, e in acc["expert"]])
    ranking = {}
    for name, parts in acc["neg"].items():
        e_neg = np.concatenate(parts)
        ranking[name] = {
            "accuracy": float(np.mean(e_expert < e_neg)),
            "auc": roc_auc(e_expert, e_neg),
            "e_expert": float(e_expert.mean()),
            "e_negative": float(e_neg.mean()),
        }
    rows = []
    for steps, alpha in grid:
        row: dict[str, Any] = {"steps": steps, "alpha": alpha}
        for name in ("pert", "policy"):
            parts = acc[name][(steps, alpha)]
            start, end = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            trace_energy = np.concatenate([p[2] for p in parts], axis=1)
            clipped = np.concatenate([p[3] for p in parts], axis=1)
            row[name] = {
                "mse_before": _mse(start, expert, valid),
                "mse_after": _mse(end, expert, valid),
                "energy_per_step": [float(e) for e in trace_energy.mean(axis=1)],
                "energy_before": float(trace_energy[0].mean()),
                "energy_after": float(trace_energy[-1].mean()),
                "change": float(np.mean(np.sqrt(np.sum(np.square(end - start), axis=(1, 2))))),
                "clipped_frac": float(clipped.mean()) if clipped.size else 0.0,
            }
        rows.append(row)
    candidates = _summarize_candidates(acc, expert, e_expert, valid)
    return {
        "frames": int(expert.shape[0]),
        "ranking": {**ranking, "policy_samples": candidates["ranking"]},
        "correction": rows,
        "selection": candidates["selection"],
        "guided": candidates["guided"],
        "energies": {
            "expert": e_expert.tolist(),
            **{k: np.concatenate(v).tolist() for k, v in acc["neg"].items()},
            "policy_samples": np.concatenate(acc["sample_energies"]).tolist(),  # (frames, max n)
        },
    }


def format_table(report: dict[str, Any]) -> str:
    """Readable terminal tables: ranking per negative kind, then correction per (steps, alpha)."""
    lines = [f"held-out frames: {report['frames']}", "", f"{'negatives':<14}{'accuracy':>10}{'auc':>8}{'E_expert':>10}{'E_neg':>10}"]
    for name, r in report["ranking"].items():
        lines.append(f"{name:<14}{r['accuracy']:>10.3f}{r['auc']:>8.3f}{r['e_expert']:>10.4f}{r['e_negative']:>10.4f}")
    head = f"{'steps':>5}{'alpha':>7} | {'perturbed: mse':>15}{'->':>3}{'mse':>8}{'E':>9}{'->':>3}{'E':>8}{'|da|':>7}{'clip':>6}"
    head += f" | {'policy: E':>10}{'->':>3}{'E':>8}{'|da|':>7}{'mse*':>8}{'->':>3}{'mse*':>8}"
    lines += ["", head, "-" * len(head)]
    for row in report["correction"]:
        p, q = row["pert"], row["policy"]
        lines.append(
            f"{row['steps']:>5}{row['alpha']:>7g} | {p['mse_before']:>15.4f}{'':>3}{p['mse_after']:>8.4f}"
            f"{p['energy_before']:>9.4f}{'':>3}{p['energy_after']:>8.4f}{p['change']:>7.3f}{p['clipped_frac']:>6.2f}"
            f" | {q['energy_before']:>10.4f}{'':>3}{q['energy_after']:>8.4f}{q['change']:>7.3f}"
            f"{q['mse_before']:>8.4f}{'':>3}{q['mse_after']:>8.4f}"
        )
    lines.append("(normalized action space; mse* = MSE of the policy's sample to the expert chunk)")
    head = f"{'n':>3} | {'MSE plain':>10}{'selected':>10}{'oracle':>10} | {'top-1 = oracle':>15}{'rank corr':>10}"
    lines += ["", head, "-" * len(head)]
    for row in report["selection"]:
        corr = "" if row["rank_corr"] is None else f"{row['rank_corr']:.3f}"
        lines.append(f"{row['n']:>3} | {row['mse_plain']:>10.4f}{row['mse_selected']:>10.4f}{row['mse_oracle']:>10.4f}"
                     f" | {row['top1_agreement']:>15.3f}{corr:>10}")
    lines.append("(best-of-n by energy among the policy's n samples vs the one nearest the expert; chance top-1 = 1/n)")
    lines += ["", f"{'guidance':>8}{'n':>4} | {'MSE guided':>10}"]
    lines += [f"{g['scale']:>8g}{g['n']:>4} | {g['mse_guided']:>10.4f}" for g in report["guided"]]
    return "\n".join(lines)


def save_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """sweep.png (energy and MSE vs alpha, one line per step count) and energy_hist.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    rows = report["correction"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for steps in sorted({r["steps"] for r in rows}):
        sel = sorted((r for r in rows if r["steps"] == steps), key=lambda r: r["alpha"])
        alphas = [r["alpha"] for r in sel]
        axes[0].plot(alphas, [r["policy"]["energy_after"] for r in sel], "o-", label=f"policy, {steps} steps")
        axes[0].plot(alphas, [r["pert"]["energy_after"] for r in sel], "s--", label=f"perturbed, {steps} steps")
        axes[1].plot(alphas, [r["pert"]["mse_after"] for r in sel], "s--", label=f"{steps} steps")
        axes[2].plot(alphas, [r["policy"]["mse_after"] for r in sel], "o-", label=f"{steps} steps")
    if rows:
        axes[1].axhline(rows[0]["pert"]["mse_before"], color="gray", lw=1, label="before")
        axes[2].axhline(rows[0]["policy"]["mse_before"], color="gray", lw=1, label="before")
    titles = ("energy after correction", "perturbed expert: MSE to expert", "policy samples: MSE to expert")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", xlabel="alpha", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "sweep.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    paths.append(_plot_selection(plt, report, out_dir / "selection.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    energies = report["energies"]
    for name, values in energies.items():
        ax.hist(np.ravel(values), bins=30, alpha=0.5 if name == "expert" else 0.35, label=name, histtype="stepfilled")
    ax.set(xlabel="energy", ylabel="chunks", title="energy: expert vs perturbed chunks and policy samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "energy_hist.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _plot_selection(plt, report: dict[str, Any], path: Path) -> Path:
    """MSE to the expert vs n: plain sample, selected, guided (per scale) and the oracle."""
    rows = sorted(report["selection"], key=lambda r: r["n"])
    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["mse_plain"] for r in rows], color="gray", lw=1, label="plain sample")
    ax.plot(ns, [r["mse_selected"] for r in rows], "o-", label="selected (lowest energy)")
    for scale in sorted({g["scale"] for g in report["guided"]}):
        guided = sorted((g for g in report["guided"] if g["scale"] == scale), key=lambda g: g["n"])
        ax.plot([g["n"] for g in guided], [g["mse_guided"] for g in guided], "^--", label=f"guided, scale {scale:g}")
    ax.plot(ns, [r["mse_oracle"] for r in rows], "k:", label="oracle (nearest)")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()  # else log-axis minor labels (3 x 10^0) crowd the n ticks
    ax.set(xticks=ns, xticklabels=[str(n) for n in ns], xlabel="candidates n", ylabel="MSE to expert",
           title="best of n policy samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_list(text: str, kind: type, name: str) -> tuple:
    """'0.01,0.03' -> (0.01, 0.03); a ValueError naming the option otherwise."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of {kind.__name__}s, e.g. 0.01,0.1; got {text!r}") from None
    if not values:
        raise ValueError(f"{name} is empty; give at least one value")
    return values


def holdout_source(run: LoadedRun, data: str | None, split: str) -> LeRobotSource:
    """The run's dataset (or `data`) split as the run split it (holdout fraction and seed)."""
    cfg = run.cfg
    return LeRobotSource(
        data or cfg.data.root, cfg.policy.model.action_horizon, split=split,
        holdout_fraction=cfg.data.holdout_fraction, holdout_seed=cfg.data.holdout_seed,
    )


def settings_for(run: LoadedRun, alphas: Sequence[float] | None, steps: Sequence[int] | None, **kw) -> EvalSettings:
    """Settings whose sweep defaults to the run's correction config."""
    c = run.cfg.correction
    return EvalSettings(
        alphas=tuple(alphas) if alphas else (float(c.alpha),),
        steps=tuple(steps) if steps else (c.steps,),
        clip_frac=kw.pop("clip_frac", None) or float(c.clip_frac),
        first_only=kw.pop("first_only", None) or c.first_only,
        **kw,
    )
