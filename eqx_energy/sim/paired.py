"""Paired comparison of two closed-loop evaluations on the same episodes (same seeds, same noise draws).

Episode j of a task is the same env variation and noise stream under every method, so outcomes pair up:
    wins   = #(method succeeds, baseline fails),  losses = #(method fails, baseline succeeds)
McNemar's exact test: under H0 a discordant pair is a win with probability 1/2, so
    p = min(1, 2 * sum_{k <= min(wins, losses)} C(n, k) / 2^n),   n = wins + losses     (p = 1 when n = 0)
the two-sided binomial test on the discordant pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from eqx_energy.sim.report import EvalResult


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value of `wins` vs `losses` discordant pairs (module doc)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"mcnemar_exact needs counts >= 0; got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2.0 * tail / 2.0**n)


def paired(baseline: EvalResult, method: EvalResult) -> dict[str, Any]:
    """Wins, losses and McNemar p of `method` against `baseline`, overall and per task (tasks in both)."""

    def compare(base: tuple[bool, ...], other: tuple[bool, ...], task: str) -> dict[str, Any]:
        if len(base) != len(other):
            raise ValueError(f"paired comparison of {task!r} needs the same episodes; got {len(base)} baseline and "
                             f"{len(other)} method episodes: run both with the same --episodes and --seed")
        wins = sum(o and not b for b, o in zip(base, other))
        losses = sum(b and not o for b, o in zip(base, other))
        return {"wins": wins, "losses": losses, "p_mcnemar": mcnemar_exact(wins, losses)}

    tasks = [t.task for t in method.tasks if t.task in {b.task for b in baseline.tasks}]
    per_task = {task: compare(baseline[task].successes, method[task].successes, task) for task in tasks}
    overall = compare(sum((baseline[t].successes for t in tasks), ()), sum((method[t].successes for t in tasks), ()), "overall")
    return {**overall, "tasks": per_task}


def paired_table(runs: Mapping[str, EvalResult], baselines: Mapping[str, str]) -> str:
    """Markdown: per run, overall success [Wilson CI], wins/losses and McNemar p against its baseline run
    (`baselines[name]`, absent = none), mean episode length and the policy's ms per call."""
    lines = ["| setting | success [95% CI] | vs | wins / losses | McNemar p | mean length | ms / call |",
             "|---|---|---|---|---|---|---|"]
    for name, result in runs.items():
        t = result.overall
        lo, hi = t.ci95
        base = baselines.get(name)
        if base is None or base == name:
            vs, wl, p = "-", "-", "-"
        else:
            cmp = paired(runs[base], result)
            vs, wl, p = base, f"{cmp['wins']} / {cmp['losses']}", f"{cmp['p_mcnemar']:.3g}"
        ms = result.settings.get("infer_ms_per_call")
        lines.append(f"| {name} | {t.success_rate:.3f} [{lo:.3f}, {hi:.3f}] (n={t.episodes}) | {vs} | {wl} | {p} | "
                     f"{t.mean_length:.1f} | {'-' if ms is None else f'{ms:.1f}'} |")
    return "\n".join(lines) + "\n"
