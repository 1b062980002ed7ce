"""Paired closed-loop comparison: exact McNemar against hand-computed binomial tails, wins/losses per episode."""

import pytest

from eqx_energy.sim.paired import mcnemar_exact, paired, paired_table
from eqx_energy.sim.report import EvalResult, TaskResult


@pytest.mark.parametrize("wins, losses, p", [
    (1, 6, 2 * (1 + 7) / 2**7),          # 0.125
    (0, 5, 2 / 2**5),                    # 0.0625
    (3, 3, 1.0),                         # the doubled tail exceeds 1
    (0, 0, 1.0),                         # no discordant pairs
    (10, 27, 2 * sum(__import__("math").comb(37, k) for k in range(11)) / 2**37),
    (2, 10, 2 * (1 + 12 + 66) / 2**12),  # 0.03857...
])
def test_mcnemar_matches_hand_computed_binomial_tails(wins, losses, p):
    assert mcnemar_exact(wins, losses) == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact(losses, wins) == pytest.approx(p, rel=1e-12)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="counts >= 0"):
        mcnemar_exact(-1, 2)


def _result(a, b):
    flags = lambda xs: tuple(bool(x) for x in xs)
    return EvalResult((TaskResult("reach", flags(a), (10,) * len(a), 1.0), TaskResult("push", flags(b), (20,) * len(b), 1.0)), {})


def test_paired_counts_discordant_episodes_per_task_and_overall():
    base = _result([1, 1, 0, 0, 1], [0, 0, 1])
    other = _result([1, 0, 1, 1, 1], [1, 1, 0])
    cmp = paired(base, other)
    assert (cmp["wins"], cmp["losses"]) == (4, 2)
    assert cmp["tasks"]["reach"] == {"wins": 2, "losses": 1, "p_mcnemar": 1.0}
    assert (cmp["tasks"]["push"]["wins"], cmp["tasks"]["push"]["losses"]) == (2, 1)
    assert cmp["p_mcnemar"] == pytest.approx(2 * (1 + 6 + 15) / 64)
    table = paired_table({"off": base, "select": other}, {"select": "off"})
    assert "| select | 0.750 [" in table and "| off | 4 / 2 | 0.688 |" in table
    with pytest.raises(ValueError, match="same episodes"):
        paired(base, _result([1, 0], [1, 1, 0]))
