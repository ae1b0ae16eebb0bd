"""The gated PixelCNN prior over code grids (networks/prior.py) and its config section.

Tiny models on tiny grids: causality and receptive field by gradients, learning and sampling
on a deterministic code pattern, and the config keys that build it. Then the command line
(trainer/prior.py) on a short real-MNIST run: --prior, --sample, and continuing after Ctrl-C.
"""
import math
import os
import re
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main
from configs import ConfigError, load_config
from networks.prior import GatedPixelCNN, build_prior, code_nll, layers_to_see
from trainer import export, runs
from util.codes import load_codes
from util.io import read_jsonl

# The deterministic pattern: grid g starts with code g, then code[i, j] = (g + i + 2j) % K.
# Only (0, 0) is uncertain (uniform over K), so the best mean NLL is log(K) / (H * W).
K, H, W = 10, 4, 5


def pattern_grids(first_codes):
    rows = torch.arange(H).view(1, H, 1)
    cols = torch.arange(W).view(1, 1, W)
    return (first_codes.view(-1, 1, 1) + rows + 2 * cols) % K


def follows_pattern(grids):
    """Per grid: does it equal the pattern started by its own first code?"""
    return (grids == pattern_grids(grids[:, 0, 0])).flatten(1).all(1)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = GatedPixelCNN(K, channels=16, layers=2, kernel=3)
    grids = pattern_grids(torch.arange(K))  # every grid of the pattern, one per first code
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        model.nll(grids).backward()
        optimizer.step()
    return model, grids


def expected_receptive_field(i, j, height, width, layers, kernel):
    """Positions that the logits at (i, j) see, as the module docstring states them:
    columns j-1-L*h .. j-1 of row i, and rows i-1-L*h .. i-1 at columns j-L*h .. j+L*h."""
    reach = layers * (kernel // 2)
    field = torch.zeros(height, width, dtype=torch.bool)
    field[i, max(j - 1 - reach, 0):j] = True
    field[max(i - 1 - reach, 0):i, max(j - reach, 0):j + reach + 1] = True
    return field


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_logits_see_exactly_the_past_in_their_receptive_field(kernel, layers):
    torch.manual_seed(0)
    height, width, channels = 6, 5, 4
    model = GatedPixelCNN(7, channels=channels, layers=layers, kernel=kernel).double()
    embedded = torch.randn(1, channels, height, width, dtype=torch.float64, requires_grad=True)
    logits = model.forward_embedded(embedded)
    for i in range(height):
        for j in range(width):
            (gradient,) = torch.autograd.grad(logits[0, :, i, j].sum(), embedded,
                                              retain_graph=True)
            seen = (gradient[0] != 0).any(0)
            # Exactly zero at (i, j) and at every later position in raster order.
            assert not seen.flatten()[i * width + j:].any(), (i, j)
            # No blind spot: the neighbours to the left, above and above-right are seen.
            if j > 0:
                assert seen[i, j - 1], (i, j)
            if i > 0:
                assert seen[i - 1, j], (i, j)
            if i > 0 and j + 1 < width:
                assert seen[i - 1, j + 1], (i, j)
            assert torch.equal(seen, expected_receptive_field(i, j, height, width, layers,
                                                              kernel)), (i, j)


@pytest.mark.parametrize("grid", [(7, 7), (8, 8), (16, 16), (4, 9), (2, 2)])
@pytest.mark.parametrize("kernel", [3, 5])
def test_layers_to_see_is_the_fewest_layers_that_see_every_earlier_code(grid, kernel):
    # prior.layers 0 (the default): every position sees all codes before it, and one layer
    # fewer would leave one unseen (where more than one layer is needed).
    height, width = grid
    layers = layers_to_see(grid, kernel)

    def blind_positions(n_layers):
        torch.manual_seed(0)
        model = GatedPixelCNN(5, channels=4, layers=n_layers, kernel=kernel).double()
        embedded = torch.randn(1, 4, height, width, dtype=torch.float64, requires_grad=True)
        logits = model.forward_embedded(embedded)
        blind = 0
        for i in range(height):
            for j in range(width):
                grad, = torch.autograd.grad(logits[0, :, i, j].sum(), embedded,
                                            retain_graph=True)
                seen = (grad[0] != 0).any(0).flatten()
                blind += int((~seen[:i * width + j]).sum())
        return blind

    assert blind_positions(layers) == 0
    if layers > 1:
        assert blind_positions(layers - 1) > 0


def test_the_default_prior_of_mnist_codes():
    # 7 x 7 MNIST codes: 32 channels, kernel 3 and the 6 layers that see the whole grid.
    cfg = load_config("mnist_gauss_1.yaml", [])
    prior = build_prior(cfg, (7, 7))
    assert (prior.channels, len(prior.layers), prior.kernel) == (32, 6, 3)
    with pytest.raises(ValueError, match="grid"):
        build_prior(cfg)


def test_code_nll_and_model_nll_by_hand():
    # code_nll on logits that differ by position: K = 3 codes, one 1 x 2 grid.
    #   (0, 0): logits (0, ln 2, ln 5), softmax (1, 2, 5) / 8, code 2: -ln(5/8) = ln 1.6
    #           = 0.4700036
    #   (0, 1): logits (ln 3, 0, 0), softmax (3, 1, 1) / 5, code 0: -ln(3/5) = ln(5/3)
    #           = 0.5108256
    #   sum = ln(1.6 * 5/3) = ln(8/3) = 0.9808293; mean over the 2 positions = 0.4904146.
    ln2, ln3, ln5 = math.log(2), math.log(3), math.log(5)
    logits = torch.tensor([[0.0, ln3], [ln2, 0.0], [ln5, 0.0]],
                          dtype=torch.float64).reshape(1, 3, 1, 2)
    codes = torch.tensor([[[2, 0]]])
    assert code_nll(logits, codes, "sum").item() == pytest.approx(0.9808293, abs=1e-7)
    assert code_nll(logits, codes, "mean").item() == pytest.approx(0.4904146, abs=1e-7)
    # The model: with the weights of its last 1x1 convolution zero, its logits are that
    # convolution's bias at every position, here (0, ln 2, ln 5) again: softmax (1, 2, 5) / 8,
    # so -ln p = ln 8 = 2.0794415 for code 0, ln 4 = 1.3862944 for code 1, ln 1.6 = 0.4700036
    # for code 2. Two 2 x 2 grids with six 2s, one 1 and one 0:
    #   sum = 6 ln 1.6 + ln 4 + ln 8 = 6 (3 ln 2 - ln 5) + 5 ln 2 = 23 ln 2 - 6 ln 5
    #       = 23 * 0.69314718 - 6 * 1.60943791 = 15.94238514 - 9.65662746 = 6.28575768,
    #   mean over the 8 positions = 0.7857197 (nats per code position).
    model = GatedPixelCNN(3, channels=4, layers=1, kernel=3)
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.copy_(torch.tensor([0.0, ln2, ln5]))
    nll = model.nll(torch.tensor([[[2, 2], [1, 0]], [[2, 2], [2, 2]]]))
    assert nll.dim() == 0
    assert nll.item() == pytest.approx(0.7857197, abs=1e-6)


def test_code_nll_equals_cross_entropy_on_skewed_logits():
    # Far from uniform (logits spread over +-20), so a wrong class, axis or sign shows.
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 5, 3, 4, generator=generator, dtype=torch.float64) * 10
              ).requires_grad_()
    codes = torch.randint(0, 5, (2, 3, 4), generator=generator)
    for reduction in ("mean", "sum"):
        ours = code_nll(logits, codes, reduction)
        reference = F.cross_entropy(logits, codes, reduction=reduction)
        torch.testing.assert_close(ours, reference, rtol=1e-15, atol=0)
        grad, = torch.autograd.grad(ours, logits)
        grad_reference, = torch.autograd.grad(reference, logits)
        torch.testing.assert_close(grad, grad_reference, rtol=1e-13, atol=1e-16)
    with pytest.raises(ValueError, match="reduction"):
        code_nll(logits, codes, "none")


def test_no_product_code_calls_cudas_nondeterministic_nll():
    # Under --deterministic, CUDA's NLL kernel raises; code_nll is the replacement.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    call = re.compile(r"\b(cross_entropy|nll_loss|NLLLoss|CrossEntropyLoss)\s*\(")
    # The code folders only: a dataset or checkpoint folder in the checkout can be huge.
    paths = [os.path.join(repo, "main.py")] + [
        os.path.join(folder, name)
        for package in ("benchmarks", "configs", "data", "networks", "third_party", "trainer",
                        "util")
        for folder, _, files in os.walk(os.path.join(repo, package))
        for name in files if name.endswith(".py")]
    assert {os.path.join(repo, "networks", "prior.py"),
            os.path.join(repo, "trainer", "prior.py")} <= set(paths)  # the walk found them
    offenders = []
    for path in paths:
        with open(path) as f:
            if call.search(f.read()):
                offenders.append(os.path.relpath(path, repo))
    assert offenders == []


def test_learns_the_pattern(trained):
    model, grids = trained
    best = math.log(K) / (H * W)
    nll = model.nll(grids).item()
    assert nll < best + 0.02, nll
    assert nll < 0.1 * math.log(K)


def test_samples_follow_the_learned_pattern(trained):
    model, _ = trained
    grids = model.sample(40, H, W, temperature=0.5,
                         generator=torch.Generator().manual_seed(0))
    assert follows_pattern(grids).all()
    # The first code is the one uncertain position; a flat distribution over it shows.
    assert len(grids[:, 0, 0].unique()) > 1


def test_high_temperature_breaks_the_pattern(trained):
    model, _ = trained
    grids = model.sample(10, H, W, temperature=100.0,
                         generator=torch.Generator().manual_seed(0))
    assert not follows_pattern(grids).any()


def test_sample_shape_dtype_range_and_float64():
    model = GatedPixelCNN(K, channels=8, layers=2, kernel=3).double()
    grids = model.sample(3, 2, 6, generator=torch.Generator().manual_seed(0))
    assert grids.shape == (3, 2, 6) and grids.dtype == torch.int64
    assert grids.min() >= 0 and grids.max() < K
    assert model(grids).shape == (3, K, 2, 6)
    assert model.nll(grids).dtype == torch.float64


def test_sampling_is_reproducible_by_generator_seed():
    torch.manual_seed(0)
    model = GatedPixelCNN(K, channels=8, layers=2, kernel=3)

    def draw(seed):
        return model.sample(4, 3, 4, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_non_positive_temperature_is_rejected(temperature):
    model = GatedPixelCNN(K, channels=4, layers=1, kernel=3)
    with pytest.raises(ValueError, match="temperature must be positive"):
        model.sample(1, 2, 2, temperature=temperature)


@pytest.mark.parametrize("kernel", [1, 4])
def test_model_rejects_even_or_too_small_kernel(kernel):
    with pytest.raises(ValueError, match="kernel"):
        GatedPixelCNN(K, kernel=kernel)


def test_build_prior_reads_the_config():
    cfg = load_config("mnist_gauss_1.yaml", ["prior.channels", "16", "prior.layers", "3",
                                             "prior.kernel", "3"])
    prior = build_prior(cfg)
    assert prior.embedding.weight.shape == (128, 16)  # K = quantization.size_dict of MNIST
    assert len(prior.layers) == 3
    assert prior.layers[0].vertical.kernel_size == (2, 3)
    assert prior(torch.zeros(2, 7, 7, dtype=torch.long)).shape == (2, 128, 7, 7)


def test_a_prior_drawn_from_a_generator_leaves_the_global_rng_alone():
    cfg = load_config("mnist_gauss_1.yaml", ["prior.channels", "8", "prior.layers", "2"])
    state = torch.get_rng_state()
    first, again = (build_prior(cfg, generator=torch.Generator().manual_seed(3)).state_dict()
                    for _ in range(2))
    other = build_prior(cfg, generator=torch.Generator().manual_seed(4)).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["embedding.weight"], other["embedding.weight"])
    # PyTorch's default bounds: a conv weight within 1 / sqrt(fan_in), embeddings N(0, 1).
    assert first["head.3.weight"].abs().max() <= 1 / math.sqrt(8)
    assert 0.8 < first["embedding.weight"].std() < 1.2


@pytest.mark.parametrize("key, value", [
    ("prior.channels", "0"), ("prior.layers", "-1"), ("prior.bs", "0"),
    ("prior.epoch_max", "0"), ("prior.patience", "0"), ("prior.kernel", "4"),
    ("prior.kernel", "1"), ("prior.lr", "0.0"), ("prior.lr", "-0.001"),
    ("prior.temperature", "0.0"),
])
def test_config_rejects_bad_prior_values(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        load_config("mnist_gauss_1.yaml", [key, value])
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def short_run(tmp_path_factory, mnist_runs, small_data):
    """A copy of the session's short real-MNIST SQ-VAE run (``mnist_runs``: 2 epochs of 50
    steps; 15-20 codes in use), so the prior's files stay out of the shared folder."""
    run = tmp_path_factory.mktemp("runs") / "sqvae"
    shutil.copytree(mnist_runs[0], run)
    return run, small_data


def prior_args(run, data_root, *more):
    # test.bs 100: the splits are encoded in batches of 100, not the run's 10 (measured: a
    # little faster than batches of 500 on one core, and ~4x faster than 10). A small prior
    # (16 channels, 2 layers; measured on mnist_runs: test nll 0.51 against a unigram 0.59
    # nats/position), twice as fast to train as 32 channels and 4 layers (0.47).
    return ["-c", "mnist_gauss_1.yaml", "-ts", str(run), "--prior", "path_dataset", data_root,
            "test.bs", "100",
            "prior.epoch_max", "4", "prior.bs", "32", "prior.lr", "0.003", "prior.channels", "16",
            "prior.layers", "2", *more]


def prior_records(run):
    return [r for r in read_jsonl(str(run / "metrics.jsonl")) if r["split"] == "prior_test"]


@pytest.fixture(scope="module")
def prior_run(short_run, tmp_path_factory):
    run, data_root = short_run
    assert main.run(prior_args(run, data_root)) == 0
    return run, data_root


def test_prior_beats_the_unigram_entropy_on_the_test_codes(prior_run):
    run, _ = prior_run
    (record,) = prior_records(run)
    # 7 x 7 positions per 784-pixel image: bits/dim = nats * 49 / (784 * ln 2).
    assert record["uniform"] == pytest.approx(math.log(128))
    for key in ("nll", "unigram", "uniform"):
        assert record[f"{key}_bpd"] == pytest.approx(record[key] * 49 / (784 * math.log(2)))
    assert record["nll"] < record["unigram"] < record["uniform"]
    assert record["prior_epochs"] == 4 and 1 <= record["epoch"] <= 4
    assert (run / "prior.pt").is_file() and (run / "prior_current.pt").is_file()


def test_samples_are_seeded_decodable_code_grids(prior_run, tmp_path):
    run, data_root = prior_run
    sample = ["-c", "mnist_gauss_1.yaml", "-ts", str(run), "--sample", "16", "path_dataset",
              data_root]
    assert main.run([*sample, "--seed", "3"]) == 0
    first = load_codes(str(run / "codes_samples.npz"))
    with Image.open(run / "samples.png") as image:
        # 4 x 4 grid of 28-pixel images with 2-pixel padding: 4 * 30 + 2 = 122.
        assert image.size == (122, 122)
    assert first["codes"].shape == (16, 7, 7) and first["codes"].max() < 128
    assert main.run([*sample, "--seed", "3"]) == 0
    assert np.array_equal(load_codes(str(run / "codes_samples.npz"))["codes"], first["codes"])
    assert main.run([*sample, "--seed", "4"]) == 0
    assert not np.array_equal(load_codes(str(run / "codes_samples.npz"))["codes"],
                              first["codes"])
    # The same decoder turns them into images: --encode's format, the run's config hash.
    cfg, model, _ = runs.load_run_model(str(run))
    assert first["config_hash"] == export.config_hash(cfg)
    assert export.decode_indices(model, first["codes"]).shape == (16, 1, 28, 28)


def test_interrupted_prior_continues_to_the_same_weights(short_run, prior_run, tmp_path,
                                                         capsys, stop_prior_in_epoch_2):
    run, data_root = short_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("prior*", "codes_*", "*.png"))
    before = prior_records(copy)  # copied with metrics.jsonl
    assert main.run(prior_args(copy, data_root)) == 130
    err = capsys.readouterr().err
    assert f"continue with: {shlex.quote(sys.executable)} " in err
    assert f"-ts {copy} --prior" in err
    assert prior_records(copy) == before
    stop_prior_in_epoch_2()
    assert main.run(prior_args(copy, data_root)) == 0
    assert "continuing prior_current.pt after epoch 1" in capsys.readouterr().out
    done = torch.load(run / "prior.pt", weights_only=True)
    again = torch.load(copy / "prior.pt", weights_only=True)
    assert done["epoch"] == again["epoch"] and done["prior"].keys() == again["prior"].keys()
    assert all(torch.equal(done["prior"][k], again["prior"][k]) for k in done["prior"])
    assert prior_records(copy)[-1]["nll"] == prior_records(run)[-1]["nll"]


def test_prior_flags_need_a_run_and_a_prior(short_run, tmp_path, capsys):
    run, data_root = short_run
    assert main.run(["-c", "mnist_gauss_1.yaml", "--prior"]) == 2
    assert "-ts RUN" in capsys.readouterr().err
    empty = tmp_path / "empty"
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns("prior*"))
    assert main.run(["-c", "mnist_gauss_1.yaml", "-ts", str(empty), "--sample", "4",
                     "path_dataset", data_root]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--prior" in err
