"""Training, run folders and evaluation through the command line (in-process)."""
import json
import math
import os
import shutil
import threading

import pytest
import torch

import data
import main
from configs import load_config
from networks import build_model
from tests import fixtures
from trainer import Trainer, eval_pass
from trainer.runs import create_run_dir, load_checkpoint
from util.device import seed_everything

RUN_FILES = ("config.yaml", "best.pt", "current.pt", "metrics.jsonl",
             "reconstructions_best.png", "reconstructions_current.png")


def only_run(root):
    (specific,) = os.listdir(root)
    (run,) = os.listdir(os.path.join(root, specific))
    return os.path.join(root, specific, run)


def read_metrics(run_dir, steps=False):
    """Per-epoch records (and the train_step lines too with steps=True)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return records if steps else [r for r in records if r["split"] != "train_step"]


def test_mnist_end_to_end_learns_and_reloads(tmp_path, capsys, small_data, mnist_runs):
    """100 steps on the shipped real MNIST subset beat the untrained model clearly; -ts
    reproduces the recorded test metrics (validated on the subset's 333 val images, tested on
    the first 500 test images: 50 batches of 10). The run is the session's SQ-VAE run
    (``mnist_runs``, tests/conftest.py: `main.py --save --seed 0 --limit-batches 50
    train.epoch_max 2 log.every_steps 10 test.bs 10`), copied, since -ts appends to it."""
    opts = ["train.epoch_max", "2", "test.bs", "10", "path", str(tmp_path),
            "path_dataset", small_data]
    cfg = load_config("mnist_gauss_1.yaml", opts)
    seed_everything(0)
    untrained = build_model(cfg)
    val = data.build_loaders(cfg, "cpu", 0, splits=("val",))["val"]
    mse_untrained = eval_pass(untrained, val, "deterministic")["mse"]

    # 2 epochs of 50 steps (the subset's 1,667 training images make 53 batches).
    session_run = mnist_runs[0]
    specific = os.path.basename(os.path.dirname(session_run))
    shutil.copytree(session_run, tmp_path / specific / os.path.basename(session_run))
    run_dir = only_run(tmp_path)
    for name in RUN_FILES:
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    records = read_metrics(run_dir)
    assert [r["split"] for r in records] == \
        ["train", "val_stochastic", "val"] * 2 + ["test_stochastic", "test"]
    val_record = records[-3]
    # Measured (both on the whole val split): untrained ~222 summed squared error per image,
    # ~52 after these 100 steps (~13 after 300).
    assert val_record["mse"] < 0.6 * mse_untrained
    assert val_record["mse_pixel"] == pytest.approx(val_record["mse"] / 784)
    assert val_record["step"] == 100
    assert val_record["temperature"] == pytest.approx(math.exp(-1e-5 * 100))
    assert load_config(os.path.join(run_dir, "config.yaml")).train.epoch_max == 2

    capsys.readouterr()
    assert main.run(["-c", "mnist_gauss_1.yaml", "-ts", os.path.basename(run_dir),
                     "--limit-batches", "50", "path", str(tmp_path),
                     "path_dataset", small_data]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("test (best.pt, epoch ")  # the summary last: no raw JSON line
    printed = read_metrics(run_dir)[-1]  # the -ts record
    recorded = records[-1]
    for key in ("loss", "mse", "perplexity", "kld_discrete", "kld_continuous"):
        assert printed[key] == pytest.approx(recorded[key], rel=1e-5), key
    appended = read_metrics(run_dir)
    assert len(appended) == len(records) + 2 and appended[-1]["source"] == "-ts"
    steps = [r["step"] for r in read_metrics(run_dir, steps=True) if r["split"] == "train_step"]
    assert steps == list(range(10, 101, 10))


def test_full_mnist_epoch_learns(tmp_path, full_data):
    """Tier 2: 300 steps on the full MNIST training split (50,000 images), validated on its
    official last 10,000."""
    opts = ["train.epoch_max", "1", "test.bs", "500", "path", str(tmp_path),
            "path_dataset", full_data]
    cfg = load_config("mnist_gauss_1.yaml", opts)
    seed_everything(0)
    val = data.build_loaders(cfg, "cpu", 0, splits=("val",))["val"]
    assert val.dataset_size == 10_000
    mse_untrained = eval_pass(build_model(cfg), val, "deterministic", limit=4)["mse"]
    assert main.run(["-c", "mnist_gauss_1.yaml", "--save", "--limit-batches", "300", *opts]) == 0
    val_record = [r for r in read_metrics(only_run(tmp_path)) if r["split"] == "val"][-1]
    assert val_record["step"] == 300 and val_record["mse"] < 0.6 * mse_untrained


def write_dataset(name, root):
    if name in ("MNIST", "FashionMNIST"):
        fixtures.write_mnist(root, name=name, n_train=48, n_test=8)
    elif name == "CIFAR10":
        fixtures.write_cifar10(root, n_per_batch=8, n_test=8)
    elif name == "CelebA":
        fixtures.write_celeba(root, n_train=8, n_val=4, n_test=4)
    else:
        fixtures.write_celebamask(root, n_train=8, n_val=4, n_test=4, size=64)


EXPERIMENTS = ["mnist_gauss_1", "fashion-mnist_gauss_1", "cifar10_gauss_1", "cifar10_vmf",
               "celeba_gauss_1", "celeba_gauss_2", "celeba_gauss_3", "celeba_gauss_4",
               "celebamask_vmf"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_one_short_epoch_writes_a_complete_run_folder(name, tmp_path):
    data_root, runs_root = tmp_path / "data", tmp_path / "runs"
    write_dataset(load_config(name).dataset.name, str(data_root))
    argv = ["-c", f"{name}.yaml", "--save", "--limit-batches", "2", "train.epoch_max", "1",
            "train.bs", "4", "test.bs", "4", "path", str(runs_root),
            "path_dataset", str(data_root), "nworker", "0"]
    assert main.run(argv) == 0
    run_dir = only_run(runs_root)
    for file in RUN_FILES:
        assert os.path.getsize(os.path.join(run_dir, file)) > 0, file
    records = {r["split"]: r for r in read_metrics(run_dir)}
    assert set(records) == {"train", "val_stochastic", "val", "test_stochastic", "test"}
    assert all(math.isfinite(r["loss"]) for r in records.values())
    if name == "celebamask_vmf":
        assert 0 <= records["test"]["pixel_acc"] <= 1 and 0 <= records["test"]["miou"] <= 1
        assert "acc" in records["train"]
    else:
        assert records["test"]["mse"] > 0
    state = load_checkpoint(os.path.join(run_dir, "current.pt"))
    assert state["epoch"] == 2 and state["batch"] == 0 and state["step"] == 2


def test_temperature_schedule():
    def temperature_at(cfg, step):
        return build_model(cfg).quantizer.temperature_at(step)
    cfg = load_config("mnist_gauss_1.yaml")
    assert temperature_at(cfg, 0) == 1.0
    assert temperature_at(cfg, 1) == pytest.approx(math.exp(-1e-5))
    assert temperature_at(cfg, 100_000) == pytest.approx(math.exp(-1.0))
    floored = load_config("mnist_gauss_1.yaml", ["quantization.temperature.min", "0.5"])
    assert temperature_at(floored, 100_000) == 0.5
    fixed = load_config("mnist_gauss_1.yaml", ["flags.decay", "False"])
    assert temperature_at(fixed, 100_000) == 1.0


def test_temperature_is_set_before_every_iteration(tmp_path):
    fixtures.write_mnist(str(tmp_path), n_train=48, n_test=8)
    seen = []
    cfg = load_config("mnist_gauss_1.yaml", ["path_dataset", str(tmp_path), "train.bs", "8",
                                             "quantization.temperature.decay", "0.1",
                                             "train.epoch_max", "2"])
    from trainer import Trainer
    model = build_model(cfg)
    original = model.forward

    def spy(x, mode="train", **kw):
        if mode == "train":
            seen.append(float(model.quantizer.temperature))
        return original(x, mode, **kw)

    model.forward = spy
    trainer = Trainer(cfg, model, data.build_loaders(cfg, "cpu", 0), "cpu")
    trainer.fit()
    batches = len(trainer.loaders["train"])
    assert len(seen) == 2 * batches
    expected = [math.exp(-0.1 * step) for step in range(1, 2 * batches + 1)]
    assert seen == pytest.approx(expected, rel=1e-6)


def test_deterministic_validation_loss_drives_the_learning_rate(tmp_path, monkeypatch):
    # The stochastic pass improves every epoch, the deterministic one gets worse: only the
    # deterministic loss may count. Epoch 1 sets the best, epochs 2-5 are four bad epochs
    # (patience 3), so epoch 6 trains at half the rate, and best.pt stays at epoch 1.
    fixtures.write_mnist(str(tmp_path / "data"), n_train=48, n_test=8)
    original = Trainer.evaluate_split

    def scripted(self, split):
        passes = original(self, split)
        if split != "val":
            return passes
        (stochastic, s_seconds), (deterministic, d_seconds) = passes
        return [({**stochastic, "loss": 100.0 - self.epoch}, s_seconds),
                ({**deterministic, "loss": 50.0 + self.epoch}, d_seconds)]

    monkeypatch.setattr(Trainer, "evaluate_split", scripted)
    assert main.run(["-c", "mnist_gauss_1.yaml", "--save", "--limit-batches", "1",
                     "train.epoch_max", "6", "path", str(tmp_path / "runs"), "path_dataset",
                     str(tmp_path / "data")]) == 0
    run = only_run(tmp_path / "runs")
    lrs = [r["lr"] for r in read_metrics(run) if r["split"] == "train"]
    assert lrs == [1e-3] * 5 + [5e-4]
    assert load_checkpoint(os.path.join(run, "best.pt"))["epoch"] == 1


def test_runs_started_together_get_their_own_folders(tmp_path):
    cfg = load_config("mnist_gauss_1.yaml", ["path", str(tmp_path)])
    made, barrier = [], threading.Barrier(6)

    def start():
        barrier.wait()
        made.append(create_run_dir(cfg, seed=0, now=1_700_000_000)[0])

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 6
    base = min(made, key=len)
    assert sorted(made) == sorted([base] + [f"{base}_{i}" for i in range(1, 6)])
    for folder in made:
        assert load_config(os.path.join(folder, "config.yaml")).path == str(tmp_path)


class _Batches:
    """A loader of fixed batches: what evaluate reads (len, batch_size, iteration)."""

    def __init__(self, batches):
        self.batches, self.batch_size = batches, batches[0].shape[0]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return ((x, None) for x in self.batches)


def test_the_test_records_hold_their_own_pass_by_hand():
    # -ts and the final test share meters.evaluate: its "test_stochastic" record must be the
    # stochastic pass and "test" the deterministic one. Worked here from the reconstructions:
    # the mean over batches of each image's summed squared error, with the same RNG draws.
    from trainer.logs import Display
    from trainer.meters import evaluate
    cfg = load_config("mnist_gauss_1.yaml", ["quantization.dim_dict", "4",
                                             "quantization.size_dict", "8", "network.num_rb", "1"])
    seed_everything(0)
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.rand(3, 1, 28, 28, generator=generator) for _ in range(2)]
    torch.manual_seed(5)
    records = evaluate(model, _Batches(batches), "test", 7, limit=None, display=Display())
    assert [r["split"] for r in records] == ["test_stochastic", "test"]
    torch.manual_seed(5)
    with torch.no_grad():
        by_hand = {mode: sum(((model(x, mode)[0] - x) ** 2).sum().item() / len(x)
                             for x in batches) / len(batches)
                   for mode in ("stochastic", "deterministic")}
    # The passes differ (about 4e-3 here), far beyond the float32 rounding allowed below.
    assert abs(by_hand["stochastic"] - by_hand["deterministic"]) > 1e-3
    assert records[0]["mse"] == pytest.approx(by_hand["stochastic"], rel=2e-6)
    assert records[1]["mse"] == pytest.approx(by_hand["deterministic"], rel=2e-6)
    assert records[1]["mse_pixel"] == pytest.approx(by_hand["deterministic"] / 784, rel=2e-6)
    assert all(r["epoch"] == 7 for r in records)
