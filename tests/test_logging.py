"""Self-annealing diagnostics, TensorBoard event files and terminal-free logs."""
import json
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from tests import fixtures


@pytest.fixture(scope="module")
def mnist_run(mnist_runs):
    # The session's SQ-VAE run (tests/conftest.py): 2 epochs of 50 steps logged every 10,
    # test.bs 10 (the test passes, checked for their records and tags only, see 500 images).
    run_dir = Path(mnist_runs[0])
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return run_dir, records


def test_diagnostics_at_every_interval(mnist_run):
    _, records = mnist_run
    steps = [r for r in records if r["split"] == "train_step"]
    assert [r["step"] for r in steps] == list(range(10, 101, 10))
    k = 128
    for r in steps:
        # sigma_q^2 = 1 + exp(s) starts at 11 (log_param_q_init = log 10) and stays positive.
        assert 1.0 < r["param_q"] < 50 and r["param_q_min"] == r["param_q_max"]
        assert 0 <= r["entropy"] <= math.log(k) + 1e-6
        assert r["param_x"] == pytest.approx(r["mse"] / 784, rel=1e-5)  # ARELBO's sigma_x^2
        # tau = exp(-1e-5 * step) (mnist_gauss_1.yaml: init 1, decay 1e-5, min 0).
        assert r["temperature"] == pytest.approx(math.exp(-1e-5 * r["step"]), rel=1e-12)


def test_every_evaluation_record_has_its_split_figures(mnist_run):
    # Their values are checked against the encoded codes in test_reported_numbers.py.
    _, records = mnist_run
    for r in records:
        if r["split"] in ("val", "val_stochastic", "test", "test_stochastic"):
            assert isinstance(r["codes_used"], int) and r["perplexity_split"] >= 1, r["split"]


def test_tensorboard_events_hold_the_expected_tags(mnist_run):
    run_dir, records = mnist_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("step/loss", "step/temperature", "step/lr", "step/param_q", "step/entropy",
                "step/codes_used", "train/loss", "val/mse_pixel", "val/perplexity_split",
                "test/loss", "test/perplexity"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("step/loss")] == list(range(10, 101, 10))
    # One x-axis (docs/usage.md): the global step, also for the per-epoch and test scalars.
    val_steps = [r["step"] for r in records if r["split"] == "val"]
    assert [e.step for e in events.Scalars("val/loss")] == val_steps == [50, 100]
    best = max((r for r in records if r["split"] == "val"), key=lambda r: -r["loss"])
    assert [e.step for e in events.Scalars("test/loss")] == [best["step"]]
    assert [e.step for e in events.Images("reconstructions/current")] == val_steps
    assert "reconstructions/current" in events.Tags()["images"]


def test_no_progress_bar_characters_off_a_terminal(tmp_path, capfd):
    # In this process, its standard output and error (file descriptors 1 and 2 and
    # sys.stdout/stderr) captured to files, as a run with its output redirected sees them.
    fixtures.write_mnist(str(tmp_path / "data"), n_train=96, n_test=16)
    capfd.readouterr()
    code = main.run(["-c", "mnist_gauss_1.yaml", "--save", "train.epoch_max", "2", "train.bs",
                     "8", "test.bs", "8", "log.every_steps", "2", "path", str(tmp_path / "runs"),
                     "path_dataset", str(tmp_path / "data")])
    out, err = capfd.readouterr()
    assert code == 0, err
    log = out + err
    assert "\r" not in log and "\x1b" not in log
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2  # one plain line per epoch
