"""Data-parallel training with 2 gloo processes on the CPU."""
import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import data
from configs import load_config
from networks import build_model
from tests import fixtures
from trainer import Trainer
from trainer.logs import Display
from util import distributed as dist
from util.device import seed_everything

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_history(data_root, limit=5):
    cfg = load_config("mnist_gauss_1.yaml", [
        "path_dataset", data_root, "flags.bn", "False", "train.bs", "16", "test.bs", "8",
        "train.epoch_max", "2", "log.every_steps", "2"])
    seed_everything(0)
    model = build_model(cfg)
    trainer = Trainer(cfg, model, data.build_loaders(cfg, "cpu", 0), "cpu", limit_batches=limit,
                      display=Display(log=lambda *_: None))
    trainer.fit()
    return [{k: v for k, v in r.items() if k != "seconds"} for r in trainer.history]


def _worker(rank, world, port, data_root, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), SQVAE_NO_DOWNLOAD="1")
    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = train_history(data_root)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(history, f)
        with open(os.path.join(out_dir, f"rank{rank}_warnings.json"), "w") as f:
            json.dump([str(w.message) for w in caught], f)
    finally:
        dist.shutdown()


def stride_warnings(lines):
    """DDP's complaint about a gradient laid out unlike its parameter (PyTorch's wording)."""
    return [line for line in lines if "Grad strides do not match bucket view strides" in line]


@pytest.mark.parametrize("name", ["mnist_gauss_1.yaml", "cifar10_gauss_1.yaml",
                                  "celeba_gauss_4.yaml", "celebamask_vmf.yaml",
                                  "mnist_vqvae.yaml"])
def test_every_gradient_has_its_parameters_strides(name):
    # What DDP compares with its bucket views: a gradient that differs only on a size-1
    # axis passes autograd's layout check and reaches the reducer as it is.
    # One intra-op thread, as torchrun gives each process by default: with several, oneDNN
    # returns 1x1 convolution weight gradients with other strides on their size-1 axes.
    cfg = load_config(name, ["network.num_rb", "1"] if name.startswith("celeba_") else [])
    seed_everything(0)
    model = build_model(cfg)
    shape = (2, *cfg.dataset.shape)
    x = torch.randint(0, 19, shape) if model.OUTPUTS == "labels" else torch.rand(shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model(x, "train")[1]["loss"].backward()
    finally:
        torch.set_num_threads(threads)
    mismatched = [(name, tuple(p.stride()), tuple(p.grad.stride()))
                  for name, p in model.named_parameters()
                  if p.grad is not None and p.grad.stride() != p.stride()]
    assert mismatched == []
    assert sum(p.grad is not None for p in model.parameters()) == len(list(model.parameters()))


@pytest.fixture
def mnist_root(tmp_path):
    fixtures.write_mnist(str(tmp_path / "data"), n_train=120, n_test=16)
    return str(tmp_path / "data")


def test_two_processes_agree_and_match_one_process(mnist_root, tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), mnist_root, str(tmp_path)), nprocs=2,
                       start_method="fork")
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0] == ranks[1]  # metrics are all-reduced: every process sees the same numbers
    for r in range(2):
        assert stride_warnings(json.load(open(tmp_path / f"rank{r}_warnings.json"))) == []
    single = train_history(mnist_root)
    assert [r["split"] for r in single] == [r["split"] for r in ranks[0]]
    # Same global batch (16 = 2 x 8) without BatchNorm: the same loss up to ARELBO's
    # log of a per-process mean and each process's own Gumbel noise.
    for ours, reference in zip(ranks[0], single):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=0.02), ours["split"]
        assert ours["step"] == reference["step"]


def test_torchrun_writes_one_run_folder(mnist_root, tmp_path):
    runs = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", SQVAE_NO_DOWNLOAD="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "main.py", "-c", "mnist_gauss_1.yaml", "--save", "--limit-batches", "3",
           "train.epoch_max", "1", "train.bs", "16", "test.bs", "8", "path", str(runs),
           "path_dataset", mnist_root]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert stride_warnings(done.stderr.splitlines()) == []
    (specific,) = os.listdir(runs)
    (run,) = os.listdir(runs / specific)
    files = set(os.listdir(runs / specific / run))
    assert {"config.yaml", "best.pt", "current.pt", "metrics.jsonl"} <= files
    assert not any(f.endswith(".tmp") for f in files)
    lines = [json.loads(line) for line in open(runs / specific / run / "metrics.jsonl")]
    assert [r["split"] for r in lines] == ["train", "val_stochastic", "val", "test_stochastic",
                                           "test"]
    assert done.stdout.count("run folder:") == 1
