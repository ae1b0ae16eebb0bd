"""Every user mistake and broken file ends with exit code 2 and one line on stderr that
names the problem and the fix; a non-finite loss ends with exit code 1 and keeps the last
good checkpoints.

The CLI runs in this process (``main.run``), with stdout/stderr captured at the file
descriptor level and Python warnings recorded (a warning would be a second stderr line
in a real process); two cases also run as real ``python main.py`` processes.
"""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import main
from tests.fixtures import write_mnist

REPO = Path(__file__).resolve().parents[1]
CONFIG = "mnist_gauss_1.yaml"
SMALL_NET = ["quantization.dim_dict", "8", "quantization.size_dict", "16", "network.num_rb", "1"]


@pytest.fixture(autouse=True)
def cli_state(monkeypatch):
    """main.run switches deterministic kernels on; train on one thread (several test
    processes share this machine); put both back afterwards."""
    monkeypatch.setenv("SQVAE_NO_DOWNLOAD", "1")
    monkeypatch.delenv("SQVAE_CHECKPOINTS", raising=False)
    monkeypatch.delenv("SQVAE_DATA", raising=False)
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def cli(capfd, *argv):
    """Exit code, stdout and stderr of `python main.py ARGV`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main.run([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert not caught, [str(w.message) for w in caught]
    return code, out, err


def error_line(err):
    """The one line on stderr, which must start with `error:`."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def fails(capfd, *argv, code=2):
    got, out, err = cli(capfd, *argv)
    assert got == code, (out, err)
    return error_line(err)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(str(root), n_train=60, n_test=20)
    return root


def train_argv(path, data, *more):
    return ["-c", CONFIG, "--save", "--limit-batches", "3", *SMALL_NET, "train.bs", "8",
            "test.bs", "500", "train.epoch_max", "1", "path", path, "path_dataset", data, *more]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A finished one-epoch run folder (do not modify: copy it)."""
    path = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert main.run([str(a) for a in train_argv(path, data)]) == 0
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    (run,) = (path / "mnist_sqvae_gaussian_1").iterdir()
    assert {"best.pt", "current.pt", "config.yaml"} <= {p.name for p in run.iterdir()}
    return run


def copy_run(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / trained.name))


# ---------------------------------------------------------------- configuration

def test_missing_config_file(capfd):
    line = fails(capfd, "-c", "no_such_experiment.yaml")
    assert "no_such_experiment.yaml" in line and "not found" in line
    assert "mnist_gauss_1.yaml" in line  # the files that do exist


def test_yaml_syntax_error(capfd, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n\tbs: 32\n")  # a tab cannot indent YAML
    line = fails(capfd, "-c", broken)
    assert str(broken) in line and "line 2" in line and "YAML" in line


def test_unknown_key(capfd):
    line = fails(capfd, "-c", CONFIG, "train.bsz", "16")
    assert "'train.bsz'" in line and "train.bs" in line.split("'train.bsz'", 1)[1]


def test_unknown_key_in_the_experiment_file(capfd, tmp_path):
    experiment = tmp_path / "typo.yaml"
    experiment.write_text((REPO / "configs" / CONFIG).read_text()
                          + "quantization:\n  size_dic: 64\n")
    line = fails(capfd, "-c", experiment)
    assert "quantization.size_dic" in line and "quantization.size_dict" in line


@pytest.mark.parametrize("key, value, kind", [("train.bs", "abc", "int"),
                                              ("train.lr", "fast", "float"),
                                              ("flags.decay", "3", "bool")])
def test_value_of_the_wrong_type(capfd, key, value, kind):
    line = fails(capfd, "-c", CONFIG, key, value)
    assert f"'{key}'" in line and kind in line and value in line


# ---------------------------------------------------------------- datasets

def test_missing_dataset(capfd, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = fails(capfd, *train_argv(tmp_path / "runs", empty))
    assert "MNIST" in line and str(empty / "MNIST" / "raw") in line
    assert "train-images-idx3-ubyte" in line
    # Nothing was trained: no run folder was claimed.
    assert not list((tmp_path / "runs").glob("*/*"))


def test_truncated_dataset_file(capfd, tmp_path, data):
    copy = Path(shutil.copytree(data, tmp_path / "data"))
    images = copy / "MNIST" / "raw" / "train-images-idx3-ubyte"
    os.truncate(images, images.stat().st_size - 1000)
    line = fails(capfd, *train_argv(tmp_path / "runs", copy))
    assert str(images) in line and "truncated" in line


# ---------------------------------------------------------------- run folders and checkpoints

@pytest.mark.parametrize("flag", ["-ts", "--resume"])
def test_run_folder_that_does_not_exist(capfd, tmp_path, flag):
    line = fails(capfd, "-c", CONFIG, flag, "resnet_seed0_0101_0000", "path", tmp_path)
    assert f"{flag} resnet_seed0_0101_0000" in line and "no such run folder" in line
    assert str(tmp_path / "mnist_sqvae_gaussian_1") in line  # where it looked


@pytest.mark.parametrize("flag, missing", [("-ts", "best.pt"), ("--resume", "current.pt")])
def test_run_folder_without_checkpoint(capfd, tmp_path, trained, flag, missing):
    run = tmp_path / "empty_run"
    run.mkdir()
    shutil.copy(trained / "config.yaml", run / "config.yaml")
    line = fails(capfd, "-c", CONFIG, flag, run, *SMALL_NET)
    assert str(run / missing) in line and "does not exist" in line


def test_folder_that_is_not_a_run(capfd, tmp_path):
    line = fails(capfd, "-c", CONFIG, "-ts", tmp_path)
    assert str(tmp_path) in line and "config.yaml" in line


def test_checkpoint_shapes_do_not_match_the_config(capfd, trained):
    line = fails(capfd, "-c", CONFIG, "-ts", trained, "quantization.size_dict", "8")
    assert "codebook" in line and "quantization.size_dict" in line
    assert str(trained / "best.pt") in line


def test_resume_with_another_experiment_file(capfd, trained):
    line = fails(capfd, "-c", "fashion-mnist_gauss_1.yaml", "--resume", trained)
    assert str(trained) in line and "dataset.name" in line
    assert "'MNIST'" in line and "'FashionMNIST'" in line and "experiment file" in line


def test_unavailable_device(capfd):
    if torch.cuda.is_available():  # on a GPU machine, ask for one past the last
        device, fix = f"cuda:{torch.cuda.device_count()}", "device(s) here"
    else:
        device, fix = "cuda", "--device cpu"
    line = fails(capfd, "-c", CONFIG, "--device", device)
    assert f"--device {device}" in line and fix in line


class Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for code in a hostile file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_with_pickled_objects_is_refused(capfd, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "code_ran"
    torch.save({"model": {}, "evil": Payload(str(marker))}, run / "best.pt")
    line = fails(capfd, "-c", CONFIG, "-ts", run)
    assert str(run / "best.pt") in line and "pickled" in line
    assert not marker.exists()


def truncate_half(path):
    os.truncate(path, path.stat().st_size // 2)


def test_truncated_best_checkpoint_points_to_current(capfd, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    truncate_half(run / "best.pt")
    line = fails(capfd, "-c", CONFIG, "-ts", run)
    assert str(run / "best.pt") in line and "truncated" in line
    assert "current.pt in the same folder loads fine" in line


def test_truncated_best_and_current_checkpoints(capfd, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    truncate_half(run / "best.pt")
    truncate_half(run / "current.pt")
    line = fails(capfd, "-c", CONFIG, "-ts", run)
    assert str(run / "best.pt") in line and "current.pt is not usable either" in line


def test_truncated_current_checkpoint_on_resume(capfd, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    truncate_half(run / "current.pt")
    line = fails(capfd, "-c", CONFIG, "--resume", run, *SMALL_NET)
    assert str(run / "current.pt") in line and "best.pt in the same folder loads fine" in line


# ---------------------------------------------------------------- training failures

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoints(capfd, tmp_path, data,
                                                                   monkeypatch):
    from networks.sqvae import GaussianSQVAE
    original = GaussianSQVAE.reconstruction_terms
    calls = {"train": 0}

    def poisoned(self, x_hat, x):
        terms = original(self, x_hat, x)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 7:  # training step 7 onwards
                terms["loss_rec"] = terms["loss_rec"] * float("nan")
        return terms

    monkeypatch.setattr(GaussianSQVAE, "reconstruction_terms", poisoned)
    # 5 steps an epoch; current.pt every 2 steps, best.pt after epoch 1; the next
    # checkpoint would be at step 8, after the first bad step.
    argv = train_argv(tmp_path, data, "train.epoch_max", "3", "train.ckpt_every_steps", "2")
    argv[argv.index("--limit-batches") + 1] = "5"
    line = fails(capfd, *argv, code=1)
    assert "step 7" in line and "loss=nan" in line and "loss_rec=nan" in line
    (run,) = (tmp_path / "mnist_sqvae_gaussian_1").iterdir()
    assert str(run) in line  # where the good checkpoints are
    current = torch.load(run / "current.pt", map_location="cpu", weights_only=True)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert current["step"] == 6 and best["epoch"] == 1
    for state in (current["model"], best["model"]):
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    # The saved history holds the finished epoch and nothing non-finite.
    assert [r["epoch"] for r in current["history"] if r["split"] == "train"] == [1]


def test_unwritable_output_folder_is_reported_before_training(capfd, tmp_path, data):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    code, out, err = cli(capfd, *train_argv(blocker / "runs", data))
    assert code == 2, (out, err)
    line = error_line(err)
    assert str(blocker / "runs") in line and "`path`" in line
    assert "epoch" not in out and "run folder" not in out  # no training happened


# ---------------------------------------------------------------- in a real process

def test_errors_in_a_real_process_are_one_line_without_traceback(tmp_path):
    env = {**os.environ, "SQVAE_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"}
    cases = {"config": ["-c", "no_such_experiment.yaml"],
             "dataset": ["-c", CONFIG, "--save", "path", tmp_path / "runs",
                         "path_dataset", tmp_path]}
    procs = {name: subprocess.Popen([sys.executable, "main.py", *map(str, argv)], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, argv in cases.items()}
    results = {name: (proc.wait(timeout=120), proc.stderr.read())
               for name, proc in procs.items()}
    for name, (code, err) in results.items():
        assert code == 2, (name, err)
        error_line(err)
    assert "no_such_experiment.yaml" in results["config"][1]
    assert "MNIST not found" in results["dataset"][1]
