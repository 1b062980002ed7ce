"""Metrics: JSONL records, steps/s and data wait, resume truncation, plots, wandb off by default."""

import json
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from eqx_energy.train.metrics import DataWaitTimer, MetricsLogger, plot_metrics, read_metrics


def slow_batches(n, delay):
    for i in range(n):
        time.sleep(delay)
        yield i


def test_data_wait_timer_adds_up_waiting():
    timed = DataWaitTimer(slow_batches(3, 0.02))
    assert [next(timed), next(timed)] == [0, 1]
    assert 0.035 < timed.pop() < 0.5
    assert timed.pop() == 0.0
    assert list(timed) == [2]


def test_log_records_jsonl_and_rates(tmp_path):
    with MetricsLogger(tmp_path, total_steps=20, progress=False) as log:
        time.sleep(0.05)
        rec = log.log(
            10, {"loss": jnp.float32(1.5), "accuracy": np.float32(0.25), "lr/energy": 1e-3}, data_wait_s=0.01
        )
        log.log(
            20, {"loss": jnp.float32(0.5), "accuracy": 0.75, "lr/energy": 5e-4, "e_pos": 0.2, "e_neg": 0.9}
        )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20]
    assert records[0]["loss"] == 1.5 and records[1]["e_neg"] == pytest.approx(0.9)
    assert rec == records[0]
    assert 0 < records[0]["steps_per_s"] < 10 / 0.05
    assert records[0]["data_wait_s"] == 0.01 and 0 < records[0]["data_wait_frac"] < 0.2
    assert "data_wait_s" not in records[1]
    with pytest.raises(ValueError, match="metric 'loss' must be a scalar, got shape \\(2,\\)"):
        MetricsLogger(tmp_path / "b", total_steps=1, progress=False).log(1, {"loss": jnp.ones(2)})


def test_non_finite_values_round_trip(tmp_path):
    with MetricsLogger(tmp_path, total_steps=2, progress=False) as log:
        log.log(1, {"loss": float("nan")})
        log.log(2, {"loss": 1.0})
    assert np.isnan(read_metrics(tmp_path / "metrics.jsonl")[0]["loss"])


def test_resume_drops_records_after_start_step(tmp_path):
    with MetricsLogger(tmp_path, total_steps=40, progress=False) as log:
        for step in (10, 20, 30):
            log.log(step, {"loss": float(step)})
    # Checkpoint was at 20; the run died after logging 30 and resumes from 20.
    with MetricsLogger(tmp_path, total_steps=40, start_step=20, progress=False) as log:
        log.log(30, {"loss": 3.0})
        log.log(40, {"loss": 4.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(10, 10.0), (20, 20.0), (30, 3.0), (40, 4.0)]


def test_truncated_last_line_is_dropped_on_resume_and_by_readers(tmp_path, caplog):
    """A kill mid-write leaves half a JSON line: readers skip it with a warning, a resume removes it;
    a bad line that is not the last is corruption and raises."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "time": 0.0, "loss": 1.0 / s}) for s in (10, 20, 30)]
    path.write_text("\n".join(lines) + "\n" + lines[2][:17])  # step 30's line again, cut at 17 chars
    with caplog.at_level("WARNING", logger="eqx_energy.train.metrics"):
        assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]
    assert "cut short" in caplog.text
    assert [p.name for p in plot_metrics(path, tmp_path / "plots")] == ["loss.png"]
    with MetricsLogger(tmp_path, total_steps=40, start_step=30, progress=False) as log:
        log.log(40, {"loss": 0.025})
    assert path.read_text() == "\n".join(lines) + "\n" + path.read_text().splitlines()[-1] + "\n"
    assert [r["step"] for r in read_metrics(path)] == [10, 20, 30, 40]
    path.write_text(lines[0][:17] + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_metrics(path)


def test_progress_bar_runs(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=4, progress=True) as log:
        log.log(2, {"loss": 0.5})
        log.log(4, {"loss": 0.25})
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=0.25" in err


def test_plots_written_per_panel(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {
            "step": s,
            "time": 0.0,
            "loss": 1 / s,
            "energy_loss": 2 / s,
            "e_pos": 0.1,
            "e_neg": 0.5 + s,
            "accuracy": s / 10,
            "lr/energy": 1e-3,
            "lr/policy": 1e-5,
            "grad_norm": 1.0,
            "steps_per_s": 3.0,
        }
        for s in range(1, 6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_metrics(path, tmp_path / "plots")
    assert sorted(p.name for p in written) == [
        "accuracy.png",
        "energy.png",
        "grad_norm.png",
        "loss.png",
        "lr.png",
    ]
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
    # Only the panels that have data.
    path.write_text(json.dumps({"step": 1, "time": 0.0, "loss": 1.0}) + "\n")
    assert [p.name for p in plot_metrics(path, tmp_path / "p2")] == ["loss.png"]


def test_close_writes_plots(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=2, progress=False)
    log.log(1, {"loss": 1.0, "accuracy": 0.5})
    log.log(2, {"loss": 0.5, "accuracy": 0.6})
    assert sorted(p.name for p in log.close()) == ["accuracy.png", "loss.png"]
    assert (tmp_path / "plots" / "loss.png").is_file()


def test_wandb_off_by_default_and_clear_error_when_missing(tmp_path):
    MetricsLogger(tmp_path, total_steps=1, progress=False).close()
    assert "wandb" not in sys.modules
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="train.wandb=true needs the wandb package"):
            MetricsLogger(tmp_path / "w", total_steps=1, progress=False, use_wandb=True)
    else:
        pytest.skip("wandb is installed here; the missing-package error cannot be shown")
