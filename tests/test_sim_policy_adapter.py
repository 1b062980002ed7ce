"""The oracle's choice: the candidate whose clipped first action is nearest the reference's first action."""

import numpy as np

from eqx_energy.sim.policy_adapter import nearest_candidate


def test_oracle_picks_the_candidate_nearest_the_reference_first_action():
    rng = np.random.default_rng(0)
    candidates = rng.uniform(-0.5, 0.5, (2, 3, 4, 4)).astype(np.float32)
    reference = np.zeros((2, 4, 4), np.float32)
    reference[0, 0] = candidates[0, 2, 0] + 0.01  # row 0: candidate 2 starts next to the reference
    reference[1, 0] = candidates[1, 1, 0]
    reference[:, 1:] = 5.0  # later steps of the reference do not count (the expert has no look-ahead)
    np.testing.assert_array_equal(nearest_candidate(candidates, reference), candidates[[0, 1], [2, 1]])
    # distances are taken after the [-1, 1] clip that execution applies: 3.0 acts as 1.0
    clipped = np.zeros((1, 2, 1, 4), np.float32)
    clipped[0, 0, 0, 0], clipped[0, 1, 0, 0] = 3.0, 0.5
    ref = np.full((1, 1, 4), 0.0, np.float32)
    ref[0, 0, 0] = 1.0
    np.testing.assert_array_equal(nearest_candidate(clipped, ref), clipped[:, 0])
