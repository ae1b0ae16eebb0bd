"""Every figure the tool reports, recomputed a second, independent way.

The tool's numbers come from its meters (trainer/meters.py) fed by the model's forward
pass. Each test below gets the same number from something else: the codes ``--encode``
writes, the images those codes decode to, the test images read straight from their
idx file, the terms the model returned step by step, or a hand-worked example. The
values must agree, not merely lie in a plausible range: a split perplexity computed
from the wrong histogram once passed every range check in this suite.
"""
import gzip
import json
import math
import os
from itertools import islice

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import data
import main
from configs import load_config
from networks import build_model
from trainer import CodeHistogram, Trainer, runs
from trainer.export import decode_indices
from trainer.meters import derived_metrics
from util.codes import CodeUsage, load_codes

CONFIG = "fashion-mnist_gauss_1.yaml"
K = 256           # the experiment's codebook size
DIM_X = 784       # 28 x 28 pixels
POSITIONS = 49    # 7 x 7 latent grid
N_TEST = 500      # the shipped Fashion-MNIST test subset
TEST_BS = 120     # 4 batches of 120 and a ragged one of 20


# ---------------------------------------------------------------- independent oracles

def histogram_entropy(codes):
    """Entropy (nats) of the code frequencies, by np.unique rather than the tool's bincount."""
    _, counts = np.unique(np.asarray(codes).ravel(), return_counts=True)
    q = counts / counts.sum()
    return float(-(q * np.log(q)).sum()), len(counts)


def batch_perplexity(codes):
    """The per-batch perplexity of deterministic codes: exp(-sum p log(p + 1e-7)) of the
    batch's code frequencies (the release's formula, epsilon included)."""
    _, counts = np.unique(np.asarray(codes).ravel(), return_counts=True)
    p = counts / counts.sum()
    return float(np.exp(-(p * np.log(p + 1e-7)).sum()))


def read_idx_images(path):
    """uint8 N x 28 x 28 from a gzip'ed idx3 file, parsed here (not by data/ or torchvision)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def batches(array, size):
    return [array[i:i + size] for i in range(0, len(array), size)]


def fashion_test_images(data_root):
    return read_idx_images(os.path.join(data_root, "FashionMNIST", "raw",
                                        "t10k-images-idx3-ubyte.gz")) / 255.0


@torch.no_grad()
def spread_codebook(model, x, seed=0, live=48):
    """The first `live` codebook rows drawn from the encoder's outputs on `x`, the others
    moved far away. A few hundred training steps on a CPU leave SQ-VAE on one or two codes,
    and a figure computed from one code agrees with almost any wrong formula: with codes
    spread like this, dozens are in use, unevenly, and most of the codebook is not."""
    was_training, rows = model.training, []
    for training in (True, False):  # batch statistics, and the running ones of eval mode
        z, _ = model.train(training).encoder(x)
        rows.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    model.train(was_training)
    rows = torch.cat(rows)
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:live]
    model.codebook.fill_(100.0)
    model.codebook[:live] = rows[pick]


def last_record(run_dir, split):
    return [r for r in runs.read_metrics(str(run_dir)) if r.get("split") == split][-1]


# ---------------------------------------------------------------- a run, evaluated by -ts

@pytest.fixture(scope="module")
def gauss_run(tmp_path_factory, small_data, one_thread):
    """A short SQ-VAE (I) run on the real Fashion-MNIST subset; its best.pt's codebook then
    spread over the encoder's outputs (see spread_codebook); then ``-ts RUN --encode test``
    on the whole test split (the last batch ragged) and ``-ts RUN --encode train``."""
    root = tmp_path_factory.mktemp("runs")
    assert main.run(["-c", CONFIG, "--save", "--limit-batches", "8",
                     "train.epoch_max", "2", "train.bs", "32", "log.every_steps", "4",
                     "test.bs", str(TEST_BS), "path", str(root),
                     "path_dataset", small_data]) == 0
    (run_dir,) = root.glob("*/*")
    best = runs.read_checkpoint(str(run_dir / runs.BEST))
    cfg, model, _ = runs.load_run_model(str(run_dir))
    x = torch.from_numpy(fashion_test_images(small_data)[:64, None]).float()
    spread_codebook(model, x)
    runs.save_checkpoint(str(run_dir / runs.BEST), dict(best, model=model.state_dict()))
    common = ["-c", CONFIG, "-ts", str(run_dir), "path_dataset", small_data,
              "test.bs", str(TEST_BS)]
    assert main.run([*common, "--encode", "test"]) == 0
    ts_record = last_record(run_dir, "test")
    assert ts_record["source"] == "-ts"
    assert main.run([*common, "--encode", "train"]) == 0
    return run_dir, ts_record, small_data


def test_split_perplexity_and_codes_used_equal_those_of_the_encoded_split(gauss_run):
    run_dir, record, _ = gauss_run
    codes = load_codes(str(run_dir / "codes_test.npz"))["codes"]
    assert codes.shape == (N_TEST, 7, 7)
    entropy, used = histogram_entropy(codes)
    assert record["perplexity_split"] == pytest.approx(math.exp(entropy), rel=1e-9)
    assert record["codes_used"] == used
    # Dozens of codes in use, unevenly: a wrong histogram cannot agree by luck.
    assert 20 < used <= 48


def test_batch_perplexity_is_the_mean_over_batches_of_the_encoded_codes(gauss_run):
    run_dir, record, _ = gauss_run
    codes = load_codes(str(run_dir / "codes_test.npz"))["codes"]
    per_batch = [batch_perplexity(b) for b in batches(codes, TEST_BS)]
    assert len(per_batch) == 5 and len(batches(codes, TEST_BS)[-1]) == 20
    # The release's convention: every batch counts once, the ragged last one included.
    assert record["perplexity"] == pytest.approx(np.mean(per_batch), rel=1e-5)


def test_split_entropy_is_at_least_the_mean_batch_entropy(gauss_run):
    """The split's code distribution is the mixture of its batches' distributions, weighted
    by batch size, and a mixture's entropy is at least the mean entropy of its parts."""
    run_dir, record, _ = gauss_run
    codes = load_codes(str(run_dir / "codes_test.npz"))["codes"]
    parts = batches(codes, TEST_BS)
    weights = np.array([len(b) for b in parts]) / len(codes)
    mean_entropy = float(sum(w * histogram_entropy(b)[0] for w, b in zip(weights, parts)))
    assert math.log(record["perplexity_split"]) >= mean_entropy - 1e-9
    # ... so the split perplexity cannot sit far below the mean batch perplexity either.
    assert record["perplexity_split"] >= math.exp(mean_entropy) - 1e-6
    assert record["codes_used"] >= record["perplexity_split"] - 1e-9


def test_mse_mse_pixel_and_psnr_equal_those_of_the_decoded_codes(gauss_run):
    """Decode the --encode codes, compare with the test images read from their idx file."""
    run_dir, record, data_root = gauss_run
    codes = load_codes(str(run_dir / "codes_test.npz"))["codes"]
    _, model, _ = runs.load_run_model(str(run_dir))
    decoded = decode_indices(model, codes, batch_size=1000).numpy().astype(np.float64)
    images = fashion_test_images(data_root)
    per_image = ((decoded[:, 0] - images) ** 2).sum(axis=(1, 2))
    per_batch = [b.mean() for b in batches(per_image, TEST_BS)]
    mse = float(np.mean(per_batch))  # mean over batches, as the release reports it
    assert record["mse"] == pytest.approx(mse, rel=1e-5)
    assert record["mse_pixel"] == pytest.approx(mse / DIM_X, rel=1e-5)
    assert record["psnr"] == pytest.approx(-10 * math.log10(mse / DIM_X), rel=1e-6)
    # ARELBO: loss_rec = dim_x / 2 * log(mse), averaged over batches like every term.
    loss_rec = float(np.mean([DIM_X / 2 * math.log(m) for m in per_batch]))
    assert record["loss_rec"] == pytest.approx(loss_rec, rel=1e-5)


def test_loss_is_the_sum_of_its_terms_and_entropy_is_the_discrete_kl(gauss_run):
    _, record, _ = gauss_run
    assert record["loss"] == pytest.approx(
        record["loss_rec"] + record["kld_discrete"] + record["kld_continuous"], rel=1e-6)
    # kld_discrete = sum over an image's positions of sum_k p log p = -49 * mean entropy.
    assert record["kld_discrete"] == pytest.approx(-POSITIONS * record["entropy"], rel=1e-5)
    assert record["param_x"] == pytest.approx(record["mse_pixel"], rel=1e-5)


def test_report_figures_state_the_numbers_of_the_codes(gauss_run, tmp_path, monkeypatch):
    """The codebook panel's perplexity and codes in use equal those of the encoded codes."""
    from trainer import report
    # Only the titles are checked here: the PNG files are left unencoded (most of the time;
    # test_report_export.py checks the files).
    monkeypatch.setattr(report.plots, "png_bytes", lambda fig: b"")
    run_dir, _, data_root = gauss_run
    cfg, model, _ = runs.load_run_model(str(run_dir))
    codes = load_codes(str(run_dir / "codes_test.npz"))["codes"]
    loader = data.build_loader(cfg, "test", batch_size=TEST_BS, shuffle=False)
    written = report.write_report(str(run_dir), cfg, model, loader, test_codes=codes)
    (title,) = written["report_codebook"]["titles"]
    entropy, used = histogram_entropy(codes)
    assert f"perplexity {math.exp(entropy):.1f} of K = {K}, {used} of {K} codes" in title
    (caption,) = written["report_reconstructions"]["titles"]
    decoded = decode_indices(model, codes[:16]).numpy()
    images = fashion_test_images(data_root)[:16]
    mse = float(((np.clip(decoded[:, 0], 0, 1) - images) ** 2).mean())
    assert f"MSE per pixel {mse:.4f}" in caption
    head = written["report"]["titles"]
    test = last_record(run_dir, "test")
    records = runs.read_metrics(str(run_dir))
    line = report.report_title(str(run_dir), cfg, report.training_records(records)[0], records)
    # Each figure of the title's test line from the record, PSNR recomputed from its MSE.
    psnr = -10 * math.log10(test["mse_pixel"])
    assert (f"MSE/pixel {test['mse_pixel']:.5f}, PSNR {psnr:.2f} dB, perplexity (split) "
            f"{math.exp(entropy):.1f}, codes in use {used}") in line
    assert head[-2] == title


def test_tensorboard_holds_the_values_of_metrics_jsonl(gauss_run):
    run_dir, _, _ = gauss_run
    records = runs.read_metrics(str(run_dir))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()

    def scalars(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    steps = [r for r in records if r["split"] == "train_step"]
    for key in ("codes_used", "loss", "mse_pixel", "perplexity", "entropy", "param_q",
                "temperature"):
        board = scalars(f"step/{key}")
        assert [board[r["step"]] for r in steps] == pytest.approx(
            [r[key] for r in steps], rel=1e-6), key
    for split in ("val", "train"):
        kept = [r for r in records if r["split"] == split]
        for key in ("loss", "mse_pixel", "psnr", "perplexity") + (
                ("perplexity_split", "codes_used") if split == "val" else ()):
            board = scalars(f"{split}/{key}")
            assert [board[r["step"]] for r in kept] == pytest.approx(
                [r[key] for r in kept], rel=1e-6), (split, key)


def test_prior_nll_unigram_and_bits_per_dim_from_the_encoded_codes(gauss_run):
    """The prior's line: NLL of the test codes under prior.pt by a log-sum-exp written here,
    the unigram entropy of the train split's --encode codes, and bits/dim from both."""
    from trainer.prior import load_prior
    run_dir, _, data_root = gauss_run
    assert main.run(["-c", CONFIG, "-ts", str(run_dir), "--prior",
                     "path_dataset", data_root, "prior.epoch_max", "1", "prior.bs", "100",
                     "prior.channels", "8", "prior.layers", "2"]) == 0
    record = last_record(run_dir, "prior_test")
    cfg = runs.read_run_config(str(run_dir))
    prior = load_prior(cfg, str(run_dir), "cpu")
    test_codes = load_codes(str(run_dir / "codes_test.npz"))["codes"].astype(np.int64)
    with torch.no_grad():
        logits = torch.cat([prior(torch.from_numpy(b)) for b in batches(test_codes, 1000)])
    logits = logits.double().numpy()  # N x K x H x W
    peak = logits.max(axis=1, keepdims=True)
    log_z = (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))[:, 0]
    chosen = np.take_along_axis(logits, test_codes[:, None], axis=1)[:, 0]
    assert record["nll"] == pytest.approx(float((log_z - chosen).mean()), rel=1e-5)

    train_codes = load_codes(str(run_dir / "codes_train.npz"))["codes"]
    assert record["unigram"] == pytest.approx(histogram_entropy(train_codes)[0], rel=1e-9)
    assert record["uniform"] == pytest.approx(math.log(K))
    for key in ("nll", "unigram", "uniform"):
        assert record[f"{key}_bpd"] == pytest.approx(
            record[key] * POSITIONS / (DIM_X * math.log(2)), rel=1e-9)
    # TensorBoard's prior/ scalars sit at the prior's optimizer steps (docs/usage.md): one
    # epoch of batches of 100 code grids.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("prior/val_nll")] == [math.ceil(len(train_codes) / 100)]


# ---------------------------------------------------------------- the training interval

@pytest.fixture(scope="module")
def watched_training(small_data, one_thread):
    """Train 12 steps in process, logging every 4, with the model's terms of every step
    (codes included) captured as it returned them; the codebook starts spread over the
    encoder's outputs, so each interval uses many codes."""
    cfg = load_config(CONFIG, ["path_dataset", small_data, "train.bs", "32", "test.bs",
                               str(TEST_BS), "train.epoch_max", "1", "log.every_steps", "4",
                               # small steps, so the spread codebook stays spread
                               "train.lr", "1e-5"])
    torch.manual_seed(0)
    model = build_model(cfg)
    spread_codebook(model, torch.from_numpy(fashion_test_images(small_data)[:64, None]).float())
    original, seen = model.forward, []

    def spy(x, mode="train", **kw):
        x_hat, terms = original(x, mode, **kw)
        if mode == "train":
            seen.append({k: v.detach().clone() for k, v in terms.items()})
        return x_hat, terms

    model.forward = spy
    trainer = Trainer(cfg, model, data.build_loaders(cfg, "cpu", 0), "cpu", limit_batches=12)
    trainer.fit()
    model.forward = original
    return trainer, seen


def test_interval_codes_used_is_the_histogram_of_that_intervals_codes(watched_training):
    trainer, seen = watched_training
    steps = [r for r in trainer.history if r["split"] == "train_step"]
    assert [r["step"] for r in steps] == [4, 8, 12] and len(seen) == 12
    for record in steps:
        interval = seen[record["step"] - 4:record["step"]]
        codes = torch.cat([t["codes"].reshape(-1) for t in interval]).numpy()
        assert record["codes_used"] == len(np.unique(codes))
        assert record["codes_used"] > 10


def test_interval_and_epoch_means_are_the_means_of_the_steps(watched_training):
    trainer, seen = watched_training
    for record in trainer.history:
        if record["split"] == "train_step":
            window = seen[record["step"] - 4:record["step"]]
        elif record["split"] == "train":
            window = seen
        else:
            continue
        for key in ("loss", "mse", "perplexity", "entropy", "kld_discrete", "param_q"):
            expected = float(np.mean([float(t[key]) for t in window]))
            assert record[key] == pytest.approx(expected, rel=1e-5), (record["split"], key)
        mse = float(np.mean([float(t["mse"]) for t in window]))
        assert record["mse_pixel"] == pytest.approx(mse / DIM_X, rel=1e-5)
        assert record["psnr"] == pytest.approx(-10 * math.log10(mse / DIM_X), rel=1e-6)


def test_validation_split_perplexity_is_that_of_the_validated_codes(watched_training):
    """The validation record's split figures equal the histogram of the codes the trained
    model gives the same validation batches."""
    trainer, _ = watched_training
    val = [r for r in trainer.history if r["split"] == "val"][-1]
    model = trainer.model.eval()
    loader = trainer.loaders["val"]
    with torch.no_grad():
        codes = [model.encode(x).numpy() for x, _ in islice(loader, trainer.limit or len(loader))]
    entropy, used = histogram_entropy(np.concatenate(codes))
    assert val["perplexity_split"] == pytest.approx(math.exp(entropy), rel=1e-9)
    assert val["codes_used"] == used and used >= 5
    assert val["perplexity"] == pytest.approx(np.mean([batch_perplexity(c) for c in codes]),
                                              rel=1e-5)


# ---------------------------------------------------------------- hand-worked examples

def test_code_usage_by_hand():
    # codes 0 x3, 2 x1 over K = 4: q = (3/4, 1/4); H = -(3/4 ln 3/4 + 1/4 ln 1/4).
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    usage = CodeUsage.from_codes(np.array([[0, 2], [0, 0]]), 4)
    assert usage.counts.tolist() == [3, 0, 1, 0]
    assert usage.entropy == pytest.approx(h, abs=1e-15)
    assert usage.perplexity == pytest.approx(math.exp(h), abs=1e-15)
    assert usage.codes_used == 2
    same = CodeUsage.from_counts(np.array([3, 0, 1, 0]))
    assert (same.entropy, same.codes_used) == (usage.entropy, usage.codes_used)


def test_one_code_has_zero_entropy_not_minus_zero():
    # A collapsed codebook: H = 0, printed and recorded as 0.0 (not -0.0) and perplexity 1.
    usage = CodeUsage.from_codes(np.zeros((2, 3), dtype=np.int64), 4)
    assert math.copysign(1.0, usage.entropy) == 1.0 and usage.perplexity == 1.0
    assert f"{usage.entropy:.4f}" == "0.0000"


def test_code_usage_refuses_the_wrong_kind_of_input():
    with pytest.raises(TypeError):
        CodeUsage(np.array([1, 2]))  # neither codes nor counts: say which
    with pytest.raises(ValueError):
        CodeUsage.from_counts(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError):
        CodeUsage.from_codes(np.array([0.5, 1.0]), 4)


def test_code_histogram_summary_by_hand():
    """Counts added batch by batch, then summarised: the histogram is taken once."""
    histogram = CodeHistogram(5)
    histogram.add(torch.tensor([[0, 0], [0, 1]]))
    histogram.add(torch.tensor([1, 4, 0, 0]))
    # counts (5, 2, 0, 0, 1) of 8: three codes in use.
    q = np.array([5, 2, 1]) / 8
    summary = histogram.summary()
    assert summary["codes_used"] == 3
    assert summary["perplexity_split"] == pytest.approx(math.exp(-(q * np.log(q)).sum()),
                                                        rel=1e-12)


def test_derived_metrics_by_hand():
    out = derived_metrics({"mse": 7.84, "loss": 1.0}, DIM_X)
    assert out["mse_pixel"] == pytest.approx(0.01, rel=1e-12)
    assert out["psnr"] == pytest.approx(20.0, rel=1e-12)
    assert out["loss"] == 1.0
