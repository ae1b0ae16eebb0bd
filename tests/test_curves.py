"""The learning-curve figure of trainer.compare --curves: it plots the records' own values."""
import json
import os

import pytest
from PIL import Image

from trainer import compare
from util.figures import PANELS, draw_learning_curves, epoch_series, new_figure


def epoch_records(epochs, sqvae):
    """Per-epoch train/val records with distinct, non-monotone values."""
    out = []
    for e in epochs:
        val = {"split": "val", "epoch": e, "mse_pixel": 0.01 / e + 0.001 * (e % 2),
               "perplexity_split": 10.0 * e + (3 if sqvae else 0), "codes_used": 20 + e,
               "entropy": (3.0 - 0.2 * e) if sqvae else 0.0}
        train = {"split": "train", "epoch": e, "temperature": 0.99 ** (1000 * e)}
        if sqvae:
            train["param_q"] = 11.0 - e
        out += [train, dict(val, split="val_stochastic", mse_pixel=1.0), val]
    return out


def test_epoch_series_takes_the_last_record_of_each_epoch():
    records = [{"split": "val", "epoch": 1, "mse_pixel": 0.5},
               {"split": "val", "epoch": 2, "mse_pixel": float("nan")},
               {"split": "val", "epoch": 1, "mse_pixel": 0.25},
               {"split": "train", "epoch": 3, "mse_pixel": 9.0},
               {"split": "val", "epoch": 3, "mse_pixel": 0.125}]
    assert epoch_series(records, "val", "mse_pixel") == ([1, 3], [0.25, 0.125])


def test_every_panel_plots_the_records_values():
    sq, vq = epoch_records(range(1, 6), True), epoch_records(range(1, 4), False)
    fig = new_figure(15, 8)
    titles = draw_learning_curves(fig, [("SQ", sq), ("VQ", vq)])
    assert titles == [title for _, _, title, _, _ in PANELS]
    for ax, (split, key, title, _, sqvae_only) in zip(fig.axes, PANELS):
        lines = {line.get_label(): line for line in ax.get_lines()}
        # VQ-VAE has no self-annealing to show.
        assert set(lines) == ({"SQ"} if sqvae_only else {"SQ", "VQ"}), title
        for label, records in (("SQ", sq), ("VQ", vq)):
            if label not in lines:
                continue
            expected = [r[key] for r in records if r["split"] == split]
            assert list(lines[label].get_xdata()) == [r["epoch"] for r in records
                                                      if r["split"] == split]
            assert list(lines[label].get_ydata()) == pytest.approx(expected, rel=1e-12)


def test_vqvae_runs_alone_draw_the_top_row_only():
    fig = new_figure(15, 8)
    titles = draw_learning_curves(fig, [("VQ", epoch_records(range(1, 3), False))])
    assert titles == [title for _, _, title, _, only in PANELS if not only]


def write_run(folder, records, model):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(f"model:\n  name: {model}\n  param_var_q: gaussian_1\n"
                "dataset:\n  name: MNIST\nquantization:\n  ema: false\n")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_compare_curves_writes_the_figure_from_run_folders(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(str(root / "sq" / "resnet_seed0_1204_1119"), epoch_records(range(1, 4), True),
              "GaussianSQVAE")
    write_run(str(root / "sq" / "resnet_seed1_1204_1120"), epoch_records(range(1, 3), True),
              "GaussianSQVAE")
    write_run(str(root / "vq" / "resnet_seed0_1204_1119"), epoch_records(range(1, 4), False),
              "VQVAE")
    runs = compare.curve_runs([str(root)])
    # Two runs of one model are told apart by their seed; unfinished runs (no test record)
    # count.
    assert [label for label, _ in runs] == ["GaussianSQVAE (gaussian_1), seed 0",
                                            "GaussianSQVAE (gaussian_1), seed 1", "VQVAE"]
    out = tmp_path / "curves.png"
    assert compare.main([str(root), "--curves", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1500, 800)
