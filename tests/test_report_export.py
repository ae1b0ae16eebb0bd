"""-ts RUN --report and --encode: the report figures, and codes that decode exactly."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main
from configs import load_config
from networks import build_model
from trainer import export, report, runs
from trainer.runs import RunError
from util import figures as plots
from util.codes import CodesError, load_codes, pack_codes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANELS = ("report", "report_curves", "report_codebook", "report_reconstructions")
CURVE_TITLES = ["Loss", "Reconstruction MSE per pixel", "Code perplexity (per batch)",
                r"Quantizer variance $\sigma^2_q$ (variant I)",
                "Entropy of the code distribution", "Codes in use"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, one_thread, small_data):
    """A tiny real-MNIST run, then one `-ts RUN --report --encode test` (one call: the report
    reuses the test codes, which saves a pass over the test split). The -ts evaluation is cut
    to one batch of 100; --encode and the report's codebook must still cover the whole split.
    Yields the run folder and what write_report returned (file paths, axes titles)."""
    root = tmp_path_factory.mktemp("runs")
    written = {}
    original = report.write_report

    def capture(*args, **kwargs):
        written.update(original(*args, **kwargs))
        return written

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SQVAE_NO_DOWNLOAD", "1")
        # 10 steps logged every 2, validation on 250 images: seconds on one CPU core.
        assert main.run(["-c", "mnist_gauss_1.yaml", "--save", "--limit-batches", "5",
                         "train.epoch_max", "2", "train.bs", "16", "log.every_steps", "2",
                         "test.bs", "50", "path", str(root), "path_dataset", small_data]) == 0
        (specific,) = os.listdir(root)
        (name,) = os.listdir(root / specific)
        run_dir = str(root / specific / name)
        mp.setattr(report, "write_report", capture)
        assert main.run(["-c", "mnist_gauss_1.yaml", "-ts", run_dir, "--report", "--encode",
                         "test", "--limit-batches", "1", "test.bs", "100",
                         "path_dataset", small_data]) == 0
        yield run_dir, written


def test_report_writes_the_figure_and_its_three_panels(reported_run):
    run_dir, written = reported_run
    for name in PANELS:
        path = os.path.join(run_dir, f"{name}.png")
        assert os.path.getsize(path) > 10_000, name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 600 <= width <= 2500 and 300 <= height <= 2500, (name, image.size)
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]

    assert written["report_curves"]["titles"] == CURVE_TITLES
    (codebook,) = written["report_codebook"]["titles"]
    # The histogram covers all 10,000 test images (7 x 7 positions each), not the one
    # batch the -ts evaluation was limited to.
    assert "Codebook usage on the test split (490,000 positions)" in codebook
    assert "of K = 128" in codebook and "codes in use" in codebook
    (recon,) = written["report_reconstructions"]["titles"]
    assert recon.startswith("First 16 test images") and "MSE per pixel" in recon
    assert written["report"]["titles"] == CURVE_TITLES + [codebook, recon]


def test_report_draws_train_step_lines_and_val_markers(reported_run):
    run_dir, _ = reported_run
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train, label, val = report.training_records(records)
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10]
    assert label == "train (mean over 2 steps)"
    assert [r["step"] for r in val] == [5, 10]


def test_curves_fall_back_to_epoch_records_and_label_the_quantizer():
    records = [{"split": "train", "epoch": e, "step": 100 * e, "loss": 10.0 / e,
                "mse_pixel": 0.1 / e ** 2, "perplexity": 50.0, "entropy": 3.0,
                "param_q": 10.0 ** (1 - e), "param_q_min": 10.0 ** (-e),
                "param_q_max": 10.0 ** (2 - e)} for e in (1, 2, 3)]
    records += [dict(r, split="val") for r in records]
    train, label, val = report.training_records(records)
    assert label == "train (epoch mean)" and len(train) == len(val) == 3

    fig = plots.new_figure(12, 6)
    titles = plots.draw_curves(fig, train, val, variant="III", band=True, num_codes=512,
                               train_label=label)
    # No record holds codes_used, so that panel is left out.
    assert titles == CURVE_TITLES[:3] + [r"Quantizer variance $\sigma^2_q$ (variant III)",
                                         CURVE_TITLES[4]]
    param_axis = fig.axes[3]
    assert param_axis.get_yscale() == "log" and param_axis.collections  # the min-max band
    assert fig.axes[0].get_yscale() == "linear"

    fig = plots.new_figure(12, 6)
    vmf = [dict(r, acc=0.5 + 0.1 * r["epoch"]) for r in train]
    titles = plots.draw_curves(fig, vmf, [], quality="acc", variant="vMF", num_codes=64)
    assert "Reconstruction accuracy" in titles and r"Quantizer concentration $\kappa_q$ (vMF)" \
        in titles


def test_curves_need_the_codebook_size_for_their_guide_lines():
    # Its default once drew log(0): the entropy guide is log K, the codes guide K.
    with pytest.raises(TypeError, match="num_codes"):
        plots.draw_curves(plots.new_figure(4, 3), [], [])
    records = [{"split": "train", "step": 1, "entropy": 1.0, "codes_used": 3}]
    fig = plots.new_figure(8, 3)
    plots.draw_curves(fig, records, [], num_codes=8)
    guides = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "log K = 2.08" in guides and "K = 8" in guides

def test_encoded_codes_decode_to_the_deterministic_reconstructions(reported_run):
    run_dir, _ = reported_run
    path = os.path.join(run_dir, "codes_test.npz")
    saved = load_codes(path)
    codes = saved["codes"]
    assert codes.dtype == np.uint16 and codes.shape == (10_000, 7, 7)
    cfg, model, _ = runs.load_run_model(run_dir)
    assert saved["config_hash"] == export.config_hash(cfg)
    assert np.array_equal(saved["codebook"], model.code_vectors().detach().numpy())
    assert saved["codebook"].dtype == np.float32 and saved["codebook"].shape == (128, 64)

    decoded = export.decode_indices(model, codes, batch_size=1000)
    assert decoded.dtype == torch.float32 and decoded.shape == (10_000, 1, 28, 28)
    # The same best.pt run forward in eval mode, deterministic quantization, on the test
    # images in dataset order. The first 2,000 keep the test quick; decoding is per image.
    import data
    loader = data.build_loader(cfg, "test", batch_size=1000, shuffle=False)
    batches = iter(loader)
    model.eval()
    with torch.no_grad():
        for start in (0, 1000):
            x, _ = next(batches)
            x_hat, _ = model(x, "deterministic")
            assert torch.equal(decoded[start:start + 1000], x_hat)
            assert np.array_equal(model.encode(x).numpy(), codes[start:start + 1000])


def test_codes_files_round_trip_and_refuse_bad_input(reported_run, tmp_path):
    run_dir, _ = reported_run
    saved = load_codes(os.path.join(run_dir, "codes_test.npz"))
    copy = tmp_path / "copy.npz"
    copy.write_bytes(pack_codes(saved["codes"], saved["codebook"], saved["config_hash"]))
    again = load_codes(str(copy))
    assert again["config_hash"] == saved["config_hash"]
    assert all(np.array_equal(again[k], saved[k]) and again[k].dtype == saved[k].dtype
               for k in ("codes", "codebook"))

    with pytest.raises(CodesError, match="does not exist"):
        load_codes(str(tmp_path / "missing.npz"))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(copy.read_bytes()[:1000])
    with pytest.raises(CodesError, match="corrupt or truncated"):
        load_codes(str(corrupt))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, codes=np.array([{"a": 1}], dtype=object), codebook=saved["codebook"],
             config_hash=np.array("x"))
    with pytest.raises(CodesError, match="pickled"):
        load_codes(str(pickled))


@pytest.mark.parametrize("flags", [["--report"], ["--encode", "test"]])
def test_report_and_encode_need_a_run(flags, capsys):
    assert main.run(["-c", "mnist_gauss_1.yaml", *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "-ts RUN" in err


def test_config_hash_names_the_model_not_where_its_files_live(reported_run):
    run_dir, _ = reported_run
    path = os.path.join(run_dir, "config.yaml")
    saved = load_codes(os.path.join(run_dir, "codes_test.npz"))["config_hash"]
    assert saved == export.config_hash(runs.read_run_config(run_dir))
    # Codes stay decodable when the datasets or runs move, or training settings change...
    # (The memory layout computes the same numbers: codes of an NCHW run decode with NHWC.)
    moved = ["path_dataset", "/elsewhere", "path", "/other", "train.lr", "0.5",
             "network.channels_last", "False"]
    assert export.config_hash(load_config(path, moved)) == saved
    # ...but not with a different model.
    for change in (["quantization.size_dict", "64"], ["network.num_rb", "3"]):
        assert export.config_hash(load_config(path, change)) != saved


def test_decode_refuses_a_code_grid_of_the_wrong_size(reported_run):
    run_dir, _ = reported_run
    _, model, _ = runs.load_run_model(run_dir)
    assert model.latent_shape == (7, 7)
    assert export.decode_indices(model, np.zeros((2, 7, 7), np.int64)).shape == (2, 1, 28, 28)
    for shape in [(2, 8, 8), (2, 7), (7, 7, 7, 1)]:
        with pytest.raises(RunError, match="N x 7 x 7"):
            export.decode_indices(model, np.zeros(shape, np.int64))
    with pytest.raises(ValueError, match="N x 7 x 7"):
        model.decode(torch.zeros(1, 14, 14, dtype=torch.long))


@pytest.mark.parametrize("variant, band", [("gaussian_1", False), ("gaussian_3", True)])
def test_report_draws_the_min_max_band_where_the_variance_varies(tmp_path, monkeypatch,
                                                                 variant, band):
    # The band is drawn where the encoder has a variance head (variants II-IV).
    cfg = load_config("mnist_gauss_1", ["model.param_var_q", variant])
    records = [{"split": "train", "epoch": e, "step": 10 * e, "loss": 1.0 / e,
                "param_q": 5.0 / e, "param_q_min": 1.0 / e, "param_q_max": 10.0 / e}
               for e in (1, 2, 3)]
    (tmp_path / runs.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn, original = {}, plots.report_figures

    def capture(**parts):
        drawn.update(original(**parts))
        return drawn

    monkeypatch.setattr(report.plots, "report_figures", capture)
    # Only the drawn axes are checked here: the four PNG files are left unencoded (most of
    # write_report's time; test_report_writes_the_figure_and_its_three_panels checks them).
    monkeypatch.setattr(report.plots, "png_bytes", lambda fig: b"")
    loader = [(torch.rand(4, 1, 28, 28), torch.zeros(4))]
    report.write_report(str(tmp_path), cfg, build_model(cfg), loader,
                        np.zeros((4, 7, 7), dtype=np.int64))
    fig, _ = drawn["report_curves"]
    (param_axis,) = [ax for ax in fig.axes if ax.get_title().startswith("Quantizer variance")]
    assert bool(param_axis.collections) is band


def test_the_reconstruction_grid_puts_each_image_in_its_cell_by_hand():
    # 3 pictures in rows of 2: originals row 0, their reconstructions row 1, then the third
    # pair in rows 2 and 3 beside a grey gap; 2-pixel grey padding around every cell.
    from util.grid import reconstruction_grid
    originals = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 5) / 10
    reconstructions = originals + 0.5
    grid, centres = reconstruction_grid(originals, reconstructions, columns=2)
    assert tuple(grid.shape) == (3, 2 + 4 * (4 + 2), 2 + 2 * (5 + 2))

    def cell(row, column):
        top, left = 2 + row * 6, 2 + column * 7
        return grid[0, top:top + 4, left:left + 5]

    expected = {(0, 0): 0.0, (0, 1): 0.1, (1, 0): 0.5, (1, 1): 0.6,
                (2, 0): 0.2, (2, 1): 0.5, (3, 0): 0.7, (3, 1): 0.5}
    for (row, column), value in expected.items():
        assert torch.allclose(cell(row, column), torch.full((4, 5), value)), (row, column)
    assert grid[:, 0].eq(0.5).all() and grid[:, :, 8].eq(0.5).all()  # padding rows/columns
    assert centres == [(4.0, "original"), (10.0, "reconstruction"), (16.0, "original"),
                       (22.0, "reconstruction")]
