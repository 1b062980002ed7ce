"""correct.py eval on a tiny run trained inside the test: load_run, the report's numbers, errors."""

import json

import jax
import numpy as np
import pytest

import correct as correct_cli
from eqx_energy.checkpoints.load_run import load_run
from eqx_energy.checkpoints.run import CheckpointError
from eqx_energy.data.writer import write_lerobot_dataset
from eqx_energy.offline_eval import roc_auc

pytestmark = pytest.mark.slow  # trains a tiny run (compiles the train step, sampling and correction): minutes on 2 cores

@pytest.fixture(scope="module")
def tiny(tiny_run):
    return tiny_run


def test_roc_auc_against_pair_counting():
    pos, neg = np.array([0.1, 0.5, 0.3]), np.array([0.4, 0.5, 0.9, 0.2])
    wins = sum((n > p) + 0.5 * (n == p) for p in pos for n in neg)
    assert roc_auc(pos, neg) == pytest.approx(wins / 12)
    assert roc_auc(np.zeros(3), np.ones(2)) == 1.0


def test_load_run_restores_trained_ema(tiny):
    run_dir, _ = tiny
    run = load_run(run_dir)
    same = load_run(run_dir / "checkpoints" / "2")
    assert run.step == same.step == 2 and run.ema
    raw = load_run(run_dir, use_ema=False)
    leaves = lambda m: [np.asarray(x) for x in jax.tree.leaves(m.model.energy)]  # noqa: E731
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(run), leaves(raw)))  # EMA != raw after 2 steps
    assert all(np.array_equal(a, b) for a, b in zip(leaves(run), leaves(same)))


# Every eval here uses these settings (batches of 3): their sampling, guidance and correction programs
# compile once for the module.
SETTINGS = ["--batch-size", "3", "--alpha-sweep", "0.01,0.3", "--steps", "0,2", "--sigmas", "0.5",
            "--num-samples", "1,3", "--guide-scales", "0,0.5"]


def test_eval_writes_report_table_and_plots(tiny, tmp_path, capsys):
    run_dir, _ = tiny
    out = tmp_path / "eval"
    rc = correct_cli.main(["--ckpt", str(run_dir), "--frames", "6", *SETTINGS, "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for plot in ("sweep.png", "energy_hist.png", "selection.png"):
        assert (out / plot).stat().st_size > 0
    assert report["frames"] == 6
    assert set(report["ranking"]) == {"gauss_0.5", "shuffle", "other_chunk", "policy_samples"}
    e = report["energies"]
    for name, r in report["ranking"].items():
        expert, neg = np.array(e["expert"]), np.array(e[name])
        pairs = expert[:, None] < neg if neg.ndim == 2 else expert < neg  # policy samples: (frames, n)
        assert r["accuracy"] == pytest.approx(np.mean(pairs))
        assert r["auc"] == pytest.approx(roc_auc(expert, neg.ravel()))
    assert np.array(e["policy_samples"]).shape == (6, 3)
    one, three = sorted(report["selection"], key=lambda r: r["n"])
    # n = 1: the one candidate is the plain sample, its own oracle
    assert one["mse_selected"] == pytest.approx(one["mse_plain"]) == pytest.approx(one["mse_oracle"])
    assert one["top1_agreement"] == 1.0 and one["rank_corr"] is None
    assert three["mse_oracle"] <= min(three["mse_selected"], three["mse_plain"]) and -1 <= three["rank_corr"] <= 1
    guided = {(g["scale"], g["n"]): g["mse_guided"] for g in report["guided"]}
    assert set(guided) == {(0.0, 1), (0.0, 3), (0.5, 1), (0.5, 3)}
    assert guided[(0.0, 1)] == pytest.approx(one["mse_plain"])  # no guidance, one candidate: the plain sample
    assert guided[(0.0, 3)] == pytest.approx(three["mse_selected"])  # no guidance: selection alone
    rows = {(r["steps"], r["alpha"]): r for r in report["correction"]}
    assert set(rows) == {(0, 0.01), (0, 0.3), (2, 0.01), (2, 0.3)}
    for (steps, _), row in rows.items():
        for part in ("pert", "policy"):
            p = row[part]
            assert len(p["energy_per_step"]) == steps + 1
            if steps == 0:  # no correction: nothing moves
                assert p["change"] == 0.0 and p["mse_after"] == pytest.approx(p["mse_before"])
    # the perturbed start and the expert are the same for every setting (one seed)
    assert len({round(r["pert"]["mse_before"], 6) for r in rows.values()}) == 1
    assert rows[(2, 0.3)]["pert"]["change"] > rows[(2, 0.01)]["pert"]["change"] > 0
    assert rows[(0, 0.01)]["policy"]["mse_before"] == pytest.approx(one["mse_plain"])  # correction starts at candidate 0
    table = capsys.readouterr().out
    assert "auc" in table and "gauss_0.5" in table and "oracle" in table and str(out / "report.json") in table


def test_eval_never_overwrites_an_earlier_evaluation(tiny, tmp_path, capsys):
    """The same --out twice: the second report goes to OUT-2 (printed), the first stays byte for byte."""
    run_dir, _ = tiny
    out = tmp_path / "eval"
    argv = ["--ckpt", str(run_dir), "--frames", "3", *SETTINGS, "--out", str(out)]
    assert correct_cli.main([*argv, "--seed", "1"]) == 0
    first = (out / "report.json").read_bytes()
    assert correct_cli.main([*argv, "--seed", "2"]) == 0
    assert str(tmp_path / "eval-2" / "report.json") in capsys.readouterr().out
    assert (out / "report.json").read_bytes() == first
    assert (tmp_path / "eval-2" / "report.json").read_bytes() != first  # another seed, another report


def test_errors_are_one_line_with_nonzero_exit(tiny, tmp_path, capsys):
    run_dir, data = tiny
    assert correct_cli.main(["--ckpt", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert correct_cli.main(["--ckpt", str(run_dir / "checkpoints" / "7")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    corrupt = tmp_path / "corrupt"
    (corrupt / "checkpoints" / "2").mkdir(parents=True)
    (corrupt / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    for name in ("norm_stats.json", "tokenizer.model"):
        (corrupt / name).write_bytes((run_dir / name).read_bytes())
    assert correct_cli.main(["--ckpt", str(corrupt)]) == 2
    assert "checkpoint" in capsys.readouterr().err
    rng = np.random.default_rng(1)
    other = write_lerobot_dataset(tmp_path / "other", [({
        "image": rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8),
        "wrist_image": rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8),
        "state": rng.normal(size=(5, 3)).astype(np.float32),
        "actions": rng.normal(size=(5, 7)).astype(np.float32)}, "t")] * 3, fps=10)
    assert correct_cli.main(["--ckpt", str(run_dir), "--data", str(other), "--split", "all"]) == 2
    err = capsys.readouterr().err
    assert "does not match run" in err and "[2]" in err
    with pytest.raises(CheckpointError):
        load_run(data)
