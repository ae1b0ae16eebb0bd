"""The VQ-VAE baseline (networks/vqvae.py) and its configs.

Expected numbers are worked out by hand in the comments (or taken from docs/model.md §2 for the
networks); nothing is read back from the code under test. The last tests read the brief
SQ-VAE and VQ-VAE runs on the shipped real MNIST subset (``mnist_runs``, tests/conftest.py;
tests/test_compare.py compares them) and train VQ-VAEs for their codebook use.
"""
import json
import os

import pytest
import torch

import main
from configs import ConfigError, load_config
from networks import MODEL_REGISTRY, VQVAE, build_model, count_parameters
from tests.helpers import make_input, make_model
from trainer import runs

MODES = ("train", "deterministic", "stochastic")

# Each VQ-VAE config and the Gaussian I experiment whose networks, K, D and epochs it copies.
TWINS = {"mnist_vqvae": "mnist_gauss_1", "fashion-mnist_vqvae": "fashion-mnist_gauss_1",
         "cifar10_vqvae": "cifar10_gauss_1", "celeba_vqvae": "celeba_gauss_1"}
# docs/model.md §2 encoder/decoder counts of the twins; VQ-VAE adds K*D and no scalar.
RELEASE_NETWORKS = {"mnist_gauss_1": (116128, 116065), "fashion-mnist_gauss_1": (116128, 116065),
                 "cifar10_gauss_1": (154336, 154147), "celeba_gauss_1": (319584, 278179)}
PARAMS = {
    "mnist_vqvae": (116128 + 116065 + 128 * 64, 116128, 116065),  # 240385
    "fashion-mnist_vqvae": (116128 + 116065 + 256 * 64, 116128, 116065),  # 248577
    "cifar10_vqvae": (154336 + 154147 + 512 * 64, 154336, 154147),  # 341251
    "celeba_vqvae": (319584 + 278179 + 512 * 64, 319584, 278179),  # 630531
}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("SQVAE_CHECKPOINTS", raising=False)
    monkeypatch.delenv("SQVAE_DATA", raising=False)


def tiny_model(*opts):
    """A VQ-VAE with K = 2 codes of dimension D = 2 (MNIST networks, never run here)."""
    return make_model("mnist_vqvae", "quantization.size_dict", "2", "quantization.dim_dict", "2",
                      *opts)[1]


# ----------------------------------------------------------------------------- hand examples

def test_vq_losses_and_straight_through_gradient_by_hand():
    model = tiny_model()
    model.train()
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 2.0]]))
    # One image, one position: z = (0.5, 0.5), as a 1 x D x 1 x 1 latent.
    z = torch.tensor([0.5, 0.5]).reshape(1, 2, 1, 1).requires_grad_(True)
    z_q, out = model.quantizer(z, mode="train")
    # ||z - e0||^2 = 0.25 + 0.25 = 0.5;  ||z - e1||^2 = 2.25 + 2.25 = 4.5  ->  code 0.
    assert out["codes"].tolist() == [[[0]]]
    assert z_q.reshape(-1).tolist() == [1.0, 0.0]  # forward value: e0 exactly
    # Means over the B * H * W * D = 2 elements: 0.5 / 2, and beta times that.
    assert out["loss_codebook"].item() == pytest.approx(0.25)
    assert out["loss_commit"].item() == pytest.approx(0.0625)
    assert out["perplexity"].item() == pytest.approx(1.0, abs=1e-5)  # a single code

    # A decoder-side loss with gradient w = (3, -2) on z_q, plus the two VQ terms.
    w = torch.tensor([3.0, -2.0]).reshape(1, 2, 1, 1)
    loss = (w * z_q).sum() + out["loss_codebook"] + out["loss_commit"]
    loss.backward()
    # dL/dz = w (identity through the straight-through estimator) + 2 beta (z - e0) / 2
    #       = (3, -2) + 0.25 * (-0.5, 0.5) = (2.875, -1.875).
    assert z.grad.reshape(-1).tolist() == pytest.approx([2.875, -1.875])
    # The codebook gets only the codebook loss: dL/de0 = 2 (e0 - z) / 2 = (0.5, -0.5); e1
    # is unused.
    assert model.codebook.grad.reshape(-1).tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_vq_losses_are_means_over_all_elements():
    model = tiny_model()
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    # Two images of 1 x 2 positions; every position is nearest to e0 = 0, so the squared
    # error is |z|^2: image 0: 1 + 4 = 5 and 9 + 16 = 25; image 1: 0 + 0 and 4 + 0.
    z = torch.tensor([[[[1.0, 3.0]], [[2.0, 4.0]]],
                      [[[0.0, 2.0]], [[0.0, 0.0]]]])  # B x D x H x W = 2 x 2 x 1 x 2
    _, out = model.quantizer(z, mode="deterministic")
    # B * H * W * D = 2 * 1 * 2 * 2 = 8 elements.
    assert out["loss_codebook"].item() == pytest.approx((5 + 25 + 0 + 4) / 8)
    assert out["loss_commit"].item() == pytest.approx(0.25 * (5 + 25 + 0 + 4) / 8)


def test_ema_update_by_hand():
    model = tiny_model("quantization.ema", "True", "quantization.ema_decay", "0.9",
                       "quantization.ema_eps", "0.1")
    model.train()
    assert not model.codebook.requires_grad  # moved by the averages, not the optimizer
    q = model.quantizer
    assert {"quantizer.ema_count", "quantizer.ema_total"} <= set(model.state_dict())  # saved
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 2.0]]))
        q.ema_total.copy_(model.codebook)
    assert q.ema_count.tolist() == [0.0, 0.0]  # Sonnet's and VQ-VAE-2's start
    # Three positions (1 x 2 x 1 x 3): (0.5, 0.5) and (1.5, -0.5) are nearest e0 (squared
    # distances 0.5 and 0.5 against 4.5 and 12.5); (-1, 1) is nearest e1 (1 against 5).
    z = torch.tensor([[0.5, 1.5, -1.0], [0.5, -0.5, 1.0]]).reshape(1, 2, 1, 3)
    z_q, out = q(z.clone().requires_grad_(True), mode="train")
    assert out["codes"].tolist() == [[[0, 0, 1]]]
    # The batch is quantized with the codebook before the update.
    assert z_q.detach().reshape(2, 3).t().tolist() == [[1, 0], [1, 0], [-1, 2]]
    assert out["loss_codebook"].item() == 0.0  # dropped with EMA
    # Commitment: beta * (0.5 + 0.5 + 1) / (3 positions * 2 dimensions) = 0.25 / 3.
    assert out["loss_commit"].item() == pytest.approx(0.25 / 3)
    # counts (2, 1); sums (2, 0) and (-1, 1); decay 0.9:
    # n_k = 0.9 * 0 + 0.1 * (2, 1) = (0.2, 0.1)
    # m_0 = 0.9 * (1, 0) + 0.1 * (2, 0) = (1.1, 0);  m_1 = 0.9 * (-1, 2) + 0.1 * (-1, 1)
    #     = (-1.0, 1.9)
    assert q.ema_count.tolist() == pytest.approx([0.2, 0.1])
    assert q.ema_total.reshape(-1).tolist() == pytest.approx([1.1, 0.0, -1.0, 1.9])
    # Laplace smoothing, n = 0.3, K eps = 0.2: n_k' = (n_k + 0.1) / 0.5 * 0.3.
    s0, s1 = 0.3 / 0.5 * 0.3, 0.2 / 0.5 * 0.3
    assert model.codebook.reshape(-1).tolist() == pytest.approx([1.1 / s0, 0.0, -1.0 / s1,
                                                                 1.9 / s1])

    # No update outside training forward passes: eval mode, or another mode in train mode.
    before = [t.clone() for t in (model.codebook, q.ema_count, q.ema_total)]
    q(z, mode="deterministic")
    q(z, mode="stochastic")
    model.eval()
    q(z, mode="train")
    after = (model.codebook, q.ema_count, q.ema_total)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ----------------------------------------------------------------------------- the models

@pytest.mark.parametrize("name", sorted(PARAMS))
def test_summary_parameter_counts(name, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SQVAE_DATA", str(tmp_path))
    assert main.run(["-c", name + ".yaml", "--summary"]) == 0
    total, encoder, decoder = PARAMS[name]
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"params total={total} encoder={encoder} decoder={decoder}"
    assert (encoder, decoder) == RELEASE_NETWORKS[TWINS[name]]


def test_ema_codebook_is_not_a_trainable_parameter():
    cfg = load_config("mnist_vqvae", ["quantization.ema", "True"])
    counts = count_parameters(build_model(cfg))
    assert counts["total"] == counts["encoder"] + counts["decoder"]


@pytest.mark.parametrize("name", sorted(TWINS))
def test_configs_match_their_gaussian_twin(name):
    cfg, twin = load_config(name), load_config(TWINS[name])
    assert cfg.model.name == "VQVAE" and cfg.model.beta == 0.25
    assert cfg.quantization.ema is False
    assert cfg.path_specific == name.replace("_vqvae", "") + "_vqvae/"
    for key in ("dataset", "network"):
        assert cfg[key] == twin[key]
    for key in ("size_dict", "dim_dict", "dim_code"):
        assert cfg.quantization[key] == twin.quantization[key]
    assert cfg.train == twin.train and cfg.flags == twin.flags
    assert MODEL_REGISTRY["VQVAE"] is VQVAE and isinstance(build_model(cfg), VQVAE)


def test_same_seed_same_networks_as_gaussian_1_and_its_own_codebook_start():
    def initial(name, *opts):
        torch.manual_seed(3)
        return build_model(load_config(name, list(opts))).state_dict()
    vq, sq = initial("mnist_vqvae"), initial("mnist_gauss_1")
    networks = [k for k in vq if k.startswith(("encoder.", "decoder."))]
    assert sorted(networks + ["quantizer.codebook"]) == sorted(vq)
    assert all(torch.equal(vq[k], sq[k]) for k in networks)
    # uniform(-1/K, 1/K) with K = 128, spread over the whole interval.
    book = vq["quantizer.codebook"]
    assert book.abs().max() <= 1 / 128 and book.abs().max() > 0.99 / 128
    assert book.std() == pytest.approx((2 / 128) / 12 ** 0.5, rel=0.05)
    # From the SQ-VAE's start it is the SQ-VAE's codebook.
    normal = initial("mnist_vqvae", "quantization.init", "normal")
    assert torch.equal(normal["quantizer.codebook"], sq["quantizer.codebook"])


@pytest.mark.parametrize("opts,message", [
    (["dataset.name", "CelebAMask_HQ", "dataset.shape", "(1, 64, 64)", "dataset.dim_x", "4096",
      "network.name", "resnet_label"], "VQVAE"),
    (["model.param_var_q", "gaussian_3"], "gaussian_1"),
    (["quantization.ema_decay", "1.0"], "ema_decay"),
    (["quantization.ema_eps", "0"], "ema_eps"),
    (["model.beta", "-1"], "model.beta"),
])
def test_invalid_vqvae_configs(opts, message):
    with pytest.raises(ConfigError) as e:
        load_config("mnist_vqvae", opts)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_ema_needs_vqvae():
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", ["quantization.ema", "True"])
    assert "quantization.ema" in str(e.value)


@pytest.mark.parametrize("ema", [False, True])
def test_forward_backward_in_every_mode(ema):
    cfg, model = make_model("mnist_vqvae", "quantization.ema", str(ema))
    x = make_input(cfg, 3)
    for mode in MODES:
        model.train()
        model.zero_grad(set_to_none=True)
        x_hat, terms = model(x, mode, codes=True)
        assert x_hat.shape == x.shape
        assert set(terms) == set(VQVAE.TERMS) | {"codes"}
        assert all(terms[k].dim() == 0 and torch.isfinite(terms[k]) for k in VQVAE.TERMS)
        assert terms["codes"].shape == (3, 7, 7)
        assert terms["loss"].item() == pytest.approx(
            (terms["loss_rec"] + terms["loss_codebook"] + terms["loss_commit"]).item())
        assert terms["mse"].item() == pytest.approx(((x_hat - x) ** 2).sum().item() / 3,
                                                    rel=1e-5)  # summed per image, as SQ-VAE's
        assert terms["loss_rec"].item() == pytest.approx(terms["mse"].item() / 784)
        terms["loss"].backward()
        for net in (model.encoder, model.decoder):
            assert all(p.grad is not None for p in net.parameters())
        assert (model.codebook.grad is None) == ema
    # In eval mode every mode is the same nearest-code quantization.
    model.eval()
    outputs = [model(x, mode, codes=True) for mode in MODES]
    for x_hat, terms in outputs[1:]:
        assert torch.equal(x_hat, outputs[0][0])
        assert torch.equal(terms["codes"], outputs[0][1]["codes"])
    assert torch.equal(model.encode(x), outputs[0][1]["codes"])
    # z + (e - z) is e only up to float rounding, hence allclose.
    assert torch.allclose(model.decode(model.encode(x)), outputs[0][0], atol=1e-6)
    assert model.before_train_step(1000) == {}  # no temperature, nothing scheduled
    assert torch.equal(model(x, "deterministic")[0], outputs[0][0])
    with pytest.raises(ValueError):
        model(x, "soft")


# ----------------------------------------------------------------------------- real MNIST

def only_run(root, specific):
    (run,) = os.listdir(os.path.join(root, specific))
    return os.path.join(root, specific, run)


def last_test(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "test"][-1]


def test_both_runs_record_their_terms(mnist_runs):
    sq, vq = (last_test(run) for run in mnist_runs)
    assert set(VQVAE.TERMS) <= set(vq) and vq["loss_codebook"] > 0
    assert sq["codes_used"] > 1 and vq["codes_used"] > 1


def test_the_normal_codebook_start_collapses(tmp_path, small_data):
    # The N(0, 1) start of the SQ-VAE collapses (networks/vqvae.py): the cause, shown. It has
    # collapsed by step 50 (measured: 5 codes in use then, 4 at step 100), so one epoch of 50
    # steps on the shipped subset shows it, on 5,000 test images (50 batches of 100).
    # Measured on full MNIST (seed 0): 5 of 128 codes.
    assert main.run(["-c", "mnist_vqvae.yaml", "--save", "--seed", "0", "--limit-batches",
                     "50", "train.epoch_max", "1", "test.bs", "100", "path", str(tmp_path),
                     "path_dataset", small_data, "quantization.init", "normal"]) == 0
    assert last_test(only_run(str(tmp_path), "mnist_vqvae"))["codes_used"] < 16


@pytest.mark.parametrize("opts", [[], ["quantization.ema", "True"]], ids=["uniform", "ema"])
def test_vqvae_uses_a_quarter_of_its_codebook_after_800_steps_on_full_mnist(opts, tmp_path,
                                                                           full_data):
    # The figure: 800 steps on the full training split, then the test split.
    # Measured (seed 0): 55 of 128 codes with the uniform start, 55 with EMA.
    assert main.run(["-c", "mnist_vqvae.yaml", "--save", "--seed", "0", "--limit-batches",
                     "800", "train.epoch_max", "1", "test.bs", "500", "path", str(tmp_path),
                     "path_dataset", full_data, *opts]) == 0
    assert last_test(only_run(str(tmp_path), "mnist_vqvae"))["codes_used"] >= 32


def test_vq_runs_log_no_temperature_and_no_entropy(mnist_runs):
    # Only the stochastic quantizers have a temperature and a code distribution; the SQ-VAE run
    # of the same budget records both at every step it logs.
    sq_run, vq_run = mnist_runs
    for run, has in ((sq_run, True), (vq_run, False)):
        records = runs.read_metrics(run)
        assert records and all(("temperature" in r) == has for r in records
                                if r["split"] in ("train_step", "train", "val"))
        assert all(("entropy" in r) == has for r in records if "loss" in r)
