"""The VQ-VAE baseline (networks/vqvae.py), its configs, and util.compare.

Expected numbers are worked out by hand in the comments (or taken from docs/model.md §2 for the
networks); nothing is read back from the code under test. The last tests train SQ-VAE and
VQ-VAE briefly on the shipped real MNIST subset and compare the two run folders.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import main
from configs import ConfigError, load_config
from networks import MODEL_REGISTRY, VQVAE, build_model, count_parameters
from tests.helpers import make_input, make_model
from util import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        assert terms["entropy"].item() == 0.0
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
    model.quantizer.temperature.fill_(0.5)  # one schedule for every layer; changes nothing
    assert torch.equal(model(x, "deterministic")[0], outputs[0][0])
    with pytest.raises(ValueError):
        model(x, "soft")


# ----------------------------------------------------------------------------- real MNIST

def only_run(root, specific):
    (run,) = os.listdir(os.path.join(root, specific))
    return os.path.join(root, specific, run)


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory, small_data):
    """SQ-VAE and VQ-VAE, same seed and budget: 2 epochs of 50 training steps of 32 images,
    evaluation on 100 batches of 10 (1,000 images per pass). ~15 s on 2 idle cores."""
    root = str(tmp_path_factory.mktemp("runs"))
    budget = ["--save", "--seed", "0", "--limit-batches", "50", "train.epoch_max", "2",
              "test.bs", "10", "path", root, "path_dataset", small_data]
    for name in ("mnist_gauss_1", "mnist_vqvae"):
        assert main.run(["-c", name + ".yaml", *budget]) == 0
    return only_run(root, "mnist_sqvae_gaussian_1"), only_run(root, "mnist_vqvae")


def last_test(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "test"][-1]


def test_both_runs_record_their_terms(mnist_runs):
    sq, vq = (last_test(run) for run in mnist_runs)
    assert set(VQVAE.TERMS) <= set(vq) and vq["loss_codebook"] > 0
    assert sq["codes_used"] > 1 and vq["codes_used"] > 1


@pytest.mark.parametrize("opts,at_least", [
    ([], 32),
    (["quantization.ema", "True"], 32),
    # The N(0, 1) start of the SQ-VAE collapses (networks/vqvae.py): the cause, shown.
    (["quantization.init", "normal"], None),
])
def test_vqvae_uses_a_quarter_of_its_codebook_after_800_steps(opts, at_least, tmp_path,
                                                             small_data):
    # 16 epochs of 50 steps on the shipped subset, then the whole test split (10,000 images).
    # Measured on full MNIST (seed 0, test split): 55 of 128 codes with the uniform start,
    # 55 with EMA, 5 from N(0, 1).
    assert main.run(["-c", "mnist_vqvae.yaml", "--save", "--seed", "0", "--limit-batches",
                     "50", "train.epoch_max", "16", "test.bs", "250", "path", str(tmp_path),
                     "path_dataset", small_data, *opts]) == 0
    used = last_test(only_run(str(tmp_path), "mnist_vqvae"))["codes_used"]
    if at_least is not None:
        assert used >= at_least
    else:
        assert used < 16


def test_compare_table_and_csv(mnist_runs, tmp_path):
    out_csv = tmp_path / "table.csv"
    proc = subprocess.run([sys.executable, "-m", "util.compare", *mnist_runs, "--csv",
                           str(out_csv)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("|---")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert all(len(row) == len(compare.COLUMNS) for row in cells)
    header = cells[0]
    for run_dir, row, label in zip(mnist_runs, cells[2:], ("GaussianSQVAE (gaussian_1)", "VQVAE")):
        test = last_test(run_dir)
        got = dict(zip(header, row))
        assert got["model"] == label and got["dataset"] == "MNIST" and got["epochs"] == "2"
        assert got["run"].endswith(os.path.basename(run_dir))
        assert got["test mse/pixel"] == f"{test['mse_pixel']:.5f}"
        assert got["perplexity (split)"] == f"{test['perplexity_split']:.1f}"
        assert got["codes used"] == str(test["codes_used"])

    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["GaussianSQVAE (gaussian_1)", "VQVAE"]
    for run_dir, row in zip(mnist_runs, table):
        test = last_test(run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            train_seconds = sum(r["seconds"] for r in map(json.loads, f)
                                if r["split"] == "train")
        assert float(row["psnr (dB)"]) == pytest.approx(test["psnr"])
        assert float(row["perplexity (batch)"]) == pytest.approx(test["perplexity"])
        assert float(row["perplexity (split)"]) == pytest.approx(test["perplexity_split"])
        assert int(row["codes used"]) == test["codes_used"]
        assert float(row["train time (s)"]) == pytest.approx(train_seconds)


# ----------------------------------------------------------------------------- compare errors

def fake_run(folder, records, config="model:\n  name: VQVAE\ndataset:\n  name: MNIST\n"):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(config)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


def run_compare(argv, capsys):
    rc = compare.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_compare_run_without_test_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path / "x" / "run", [{"epoch": 1, "split": "train", "seconds": 2.0}])
    rc, out, err = run_compare([run], capsys)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "no test metrics" in err
    assert not (tmp_path / "comparison.csv").exists()


@pytest.mark.parametrize("case", ["missing", "no_config", "no_metrics", "bad_json",
                                  "pickle_config"])
def test_compare_unusable_folders(case, tmp_path, capsys):
    folder = tmp_path / "run"
    if case == "no_config":
        folder.mkdir()
    elif case == "no_metrics":
        fake_run(folder, [])
        os.remove(folder / "metrics.jsonl")
    elif case == "bad_json":
        fake_run(folder, [])
        (folder / "metrics.jsonl").write_text('{"split": "test"}\n{oops\n')
    elif case == "pickle_config":
        # safe_load refuses Python object tags instead of constructing them.
        fake_run(folder, [{"split": "test"}], config="!!python/object/apply:os.system ['true']\n")
    rc, out, err = run_compare([str(folder), "--csv", str(tmp_path / "t.csv")], capsys)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(folder) in err


def test_compare_defaults_and_missing_values(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    label_map = fake_run(tmp_path / "celebamask_sqvae_vmf" / "run", [
        {"epoch": 1, "split": "train", "seconds": 1.5},
        {"epoch": 2, "split": "train", "seconds": 2.5},
        {"epoch": 2, "split": "test", "perplexity": 3.0, "perplexity_split": 4.0,
         "codes_used": 9},
    ], config="model:\n  name: VmfSQVAE\n  param_var_q: vmf\ndataset:\n  name: CelebAMask_HQ\n")
    rc, out, _ = run_compare([label_map], capsys)
    assert rc == 0
    row = [c.strip() for c in out.splitlines()[2].strip("|").split("|")]
    assert row == ["celebamask_sqvae_vmf/run", "VmfSQVAE (vmf)", "CelebAMask_HQ", "2", "n/a",
                   "n/a", "n/a", "3.0", "4.0", "9", "n/a", "n/a", "n/a", "4.0"]
    assert os.listdir(tmp_path) == ["celebamask_sqvae_vmf"]  # writes only where told
    assert run_compare([label_map, "--csv", "t.csv"], capsys)[0] == 0
    with open(tmp_path / "t.csv", newline="") as f:
        (written,) = list(csv.DictReader(f))
    assert written["test mse/pixel"] == "" and written["train time (s)"] == "4.0"


def test_report_averages_seeds_and_reads_release_folders(tmp_path, capsys):
    def test_record(mse, ppl, codes):
        return {"split": "test", "epoch": 3, "mse": mse, "mse_pixel": mse / 784,
                "psnr": 20.0 + mse, "perplexity": ppl, "perplexity_split": ppl,
                "codes_used": codes}
    root = tmp_path / "runs"
    for seed, (mse, ppl, codes) in enumerate([(2.0, 10.0, 40), (4.0, 20.0, 50),
                                              (6.0, 30.0, 60)]):
        fake_run(root / "mnist_vqvae" / f"resnet_seed{seed}", [
            *({"epoch": e, "split": "train", "seconds": 10.0} for e in (1, 2, 3)),
            test_record(mse, ppl, codes),
            *([{"split": "prior_test", "nll": 1.0 + seed, "unigram": 3.0, "uniform": 4.85,
                "nll_bpd": 0.1, "unigram_bpd": 0.2, "uniform_bpd": 0.4}] if seed < 2 else [])])
    # A folder of the authors' release, evaluated here with -ts: configs.json is JSON.
    release = root / "release" / "resnet_seed3_1125_1927"
    release.mkdir(parents=True)
    (release / "configs.json").write_text(json.dumps(
        {"model": {"name": "GaussianSQVAE", "param_var_q": "gaussian_1"},
         "dataset": {"name": "MNIST"}}))
    (release / "metrics.jsonl").write_text(json.dumps(test_record(15.0, 24.0, 90)) + "\n")
    report = tmp_path / "results.md"
    rc, out, err = run_compare([str(root), "--report", str(report)], capsys)
    assert rc == 0, err
    text = report.read_text()
    assert text.splitlines()[4] == f"    python -m util.compare {root} --report {report}"
    # mse/image 2, 4, 6: mean 4, sample std 2; perplexity 10, 20, 30: 20 +- 10; codes
    # 40, 50, 60: 50 +- 10; prior nll of seeds 0 and 1 only: 1, 2 -> 1.5 +- 0.707; train
    # time 30 s each.
    two = "(2 of 3 runs)"
    assert ("| MNIST | VQVAE | 3 | 3 | 4.00 ± 2.00 | 0.00510 ± 0.00255 | 24.00 ± 2.00 "
            f"| 20.0 ± 10.0 | 20.0 ± 10.0 | 50.0 ± 10.0 | 1.500 ± 0.707 {two} "
            f"| 3.000 ± 0.000 {two} | 0.1000 ± 0.0000 {two} | 30.0 ± 0.0 |") in text
    assert ("| MNIST | GaussianSQVAE (gaussian_1), authors' release | n/a | 1 | 15.00 | 0.01913 "
            "| 35.00 | 24.0 | 24.0 | 90.0 | n/a | n/a | n/a | n/a |") in text
    assert "## Published figures" in text and "| 434.8 |" in text
    assert len(out.strip().splitlines()) == 2 + 4  # header, rule, one row per run


def test_compare_imports_no_other_package_of_the_repo():
    code = ("import sys, util.compare; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'configs', 'networks', 'trainer', 'data', 'third_party', 'torch'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_vqvae_uses_a_quarter_of_its_codebook_after_800_steps_on_full_mnist(tmp_path,
                                                                           full_data):
    # The figure: 800 steps on the full training split, then the test split.
    assert main.run(["-c", "mnist_vqvae.yaml", "--save", "--seed", "0", "--limit-batches",
                     "800", "train.epoch_max", "1", "test.bs", "500", "path", str(tmp_path),
                     "path_dataset", full_data]) == 0
    assert last_test(only_run(str(tmp_path), "mnist_vqvae"))["codes_used"] >= 32
