"""export_policy: a trained run's policy written in openpi's layout loads back leaf for leaf; nothing is overwritten."""

import jax
import numpy as np
import pytest

from eqx_energy.checkpoints.export_policy import main
from eqx_energy.checkpoints.load_run import load_run
from eqx_energy.checkpoints.openpi import load_openpi_params, openpi_leaves

pytestmark = pytest.mark.slow  # uses the trained tiny run


def test_exported_policy_loads_back_equal_and_is_never_overwritten(tiny_run, tmp_path, capsys):
    out = tmp_path / "policy_params"
    assert main([str(tiny_run[0]), str(out)]) == 0
    run = load_run(tiny_run[0])
    loaded = load_openpi_params(out, run.cfg.policy.model)
    want, got = openpi_leaves(run.model.policy), openpi_leaves(loaded)
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
    before = sorted(p.name for p in out.rglob("*"))
    assert main([str(tiny_run[0]), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert jax.tree.structure(loaded) == jax.tree.structure(run.model.policy)
