"""Every user mistake and broken file ends with exit code 2 and one line on stderr that
names the problem and the fix; a non-finite loss ends with exit code 1 and keeps the last
good checkpoints.

The CLI runs in this process (``main.run``), with stdout/stderr captured at the file
descriptor level and Python warnings recorded (a warning would be a second stderr line
in a real process); two cases also run as real ``python main.py`` processes.
"""
import json
import os
import shlex
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


# ---------------------------------------------------------------- records, locks, exit codes

def metrics_bytes(run):
    return (run / "metrics.jsonl").read_bytes()


def records(run, split=None):
    from util.io import read_jsonl
    return [r for r in read_jsonl(str(run / "metrics.jsonl"))
            if split is None or r["split"] == split]


def test_ts_then_resume_further_keeps_every_earlier_line(capfd, tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    assert cli(capfd, "-c", CONFIG, "-ts", run, "path_dataset", data)[0] == 0
    before = metrics_bytes(run)
    assert [r.get("source") for r in records(run, "test")] == [None, "-ts"]
    code, out, err = cli(capfd, "-c", CONFIG, "--resume", run, "train.epoch_max", "2")
    assert code == 0, err
    after = metrics_bytes(run)
    assert after.startswith(before) and len(after) > len(before)  # appended, never rewritten
    assert [r["epoch"] for r in records(run, "train")] == [1, 2]
    assert len(records(run, "test")) == 3


def test_ts_lines_written_during_training_survive_it(capfd, tmp_path, data, monkeypatch):
    from trainer import Trainer
    original = Trainer.train_epoch
    written = {}

    def evaluate_meanwhile(self):
        if self.epoch == 2 and not written:  # another process's -ts line, mid-training
            from trainer import runs
            written["record"] = {"split": "test", "epoch": 1, "source": "-ts", "loss": 1.0}
            runs.append_metrics(self.run_dir, [written["record"]])
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", evaluate_meanwhile)
    assert cli(capfd, *train_argv(tmp_path, data, "train.epoch_max", "2"))[0] == 0
    (run,) = (tmp_path / "mnist_sqvae_gaussian_1").iterdir()
    assert written["record"] in records(run)
    assert [r["epoch"] for r in records(run, "train")] == [1, 2]


def test_torn_last_line_is_skipped_with_a_warning(capfd, tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"split": "test", "epo')  # a writer killed mid-line
    with warnings.catch_warnings():
        code = main.run(["-c", CONFIG, "-ts", str(run), "path_dataset", str(data)])
    out, err = capfd.readouterr()
    assert code == 0 and "torn last line" in err and "Traceback" not in err
    # The next append starts on a fresh line: every complete line still parses.
    assert [r.get("source") for r in records(run, "test")] == [None, "-ts"]


def test_malformed_metrics_line_stops_before_any_work(capfd, tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    lines = metrics_bytes(run).split(b"\n")
    lines[1] = b"{not json"
    (run / "metrics.jsonl").write_bytes(b"\n".join(lines))
    before = metrics_bytes(run)
    for argv in (["-ts", run, "path_dataset", data], ["--resume", run]):
        code, out, err = cli(capfd, "-c", CONFIG, *argv)
        assert code == 2 and "line 2 is not a JSON record" in error_line(err)
        assert "test (" not in out and "epoch" not in out  # nothing was evaluated or trained
    assert metrics_bytes(run) == before


HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from trainer import runs
lock = runs.writer_lock(sys.argv[2])
print("held", flush=True)
time.sleep(120)
"""


def test_one_writer_per_run_folder(capfd, tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(REPO), str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        line = fails(capfd, "-c", CONFIG, "--resume", run, "train.epoch_max", "2")
        assert f"process {holder.pid}" in line and str(run) in line
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        # -ts only reads, and appends its lines without the writer lock.
        assert cli(capfd, "-c", CONFIG, "-ts", run, "path_dataset", data)[0] == 0
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops a killed holder's lock: no stale lock to clean up.
    assert cli(capfd, "-c", CONFIG, "--resume", run, "train.epoch_max", "2")[0] == 0


@pytest.mark.parametrize("errno, words", [(28, "No space left on device"),
                                          (30, "Read-only file system")])
def test_disk_full_or_read_only_is_one_line_exit_1(capfd, tmp_path, data, monkeypatch, errno,
                                                   words):
    from trainer import runs
    original = runs.save_checkpoint

    def fail_at_step_4(path, state):
        if state.get("step", 0) >= 4:
            raise OSError(errno, words, path + ".tmp")
        original(path, state)

    monkeypatch.setattr(runs, "save_checkpoint", fail_at_step_4)
    argv = train_argv(tmp_path, data, "train.epoch_max", "2", "train.ckpt_every_steps", "2")
    line = fails(capfd, *argv, code=1)
    assert words in line and "resume" in line
    (run,) = (tmp_path / "mnist_sqvae_gaussian_1").iterdir()
    monkeypatch.setattr(runs, "save_checkpoint", original)
    # What was written before is whole, and the run resumes from it.
    assert torch.load(run / "current.pt", weights_only=True)["step"] == 3  # end of epoch 1
    assert cli(capfd, "-c", CONFIG, "--resume", run)[0] == 0


@pytest.mark.parametrize("opts, words", [
    (["train.lr", "-1"], "train.lr"),
    (["train.bs_per_rank", "-1"], "train.bs_per_rank"),
    (["train.drop_last", "True", "train.bs", "60000"], "no training batch"),
    (["path_checkpoint", "/elsewhere"], "path_checkpoint"),
])
def test_input_rejected_before_a_run_folder_exists(capfd, tmp_path, data, opts, words):
    line = fails(capfd, *train_argv(tmp_path / "runs", data, *opts))
    assert words in line
    assert not (tmp_path / "runs" / "mnist_sqvae_gaussian_1").exists() or \
        not any((tmp_path / "runs" / "mnist_sqvae_gaussian_1").iterdir())


@pytest.mark.parametrize("name, key, flag", [("current.pt", "optimizer", "--resume"),
                                             ("current.pt", "epoch", "--resume"),
                                             ("best.pt", "epoch", "-ts")])
def test_checkpoint_lacking_a_key_is_one_line(capfd, tmp_path, trained, data, name, key,
                                              flag):
    run = copy_run(trained, tmp_path)
    state = torch.load(run / name, weights_only=True)
    del state[key]
    torch.save(state, run / name)
    line = fails(capfd, "-c", CONFIG, flag, run, "path_dataset", data)
    assert str(run / name) in line and f"lacks {key}" in line


def test_ts_with_resume_is_refused(capfd, trained):
    line = fails(capfd, "-c", CONFIG, "-ts", trained, "--resume", trained)
    assert "-ts" in line and "--resume" in line


def test_bad_run_config_names_its_path_once(capfd, tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    (run / "config.yaml").write_text("train: [unclosed\n")
    line = fails(capfd, "-c", CONFIG, "-ts", run, "path_dataset", data)
    assert line.count(str(run / "config.yaml")) == 1


def interrupt(*_, **__):
    raise KeyboardInterrupt


def test_ctrl_c_at_start_up_exits_130(capfd, tmp_path, data, monkeypatch):
    import data as datasets
    monkeypatch.setattr(datasets, "build_loaders", interrupt)
    code, out, err = cli(capfd, *train_argv(tmp_path, data))
    assert code == 130 and "Traceback" not in err and "nothing to resume" in err


def test_ctrl_c_during_ts_exits_130_and_writes_nothing(capfd, tmp_path, trained, data,
                                                      monkeypatch):
    from trainer import commands
    run = copy_run(trained, tmp_path)
    before = metrics_bytes(run)
    monkeypatch.setattr(commands, "evaluate", interrupt)
    code, out, err = cli(capfd, "-c", CONFIG, "-ts", run, "path_dataset", data)
    assert code == 130 and "run -ts again" in err and "Traceback" not in err
    assert metrics_bytes(run) == before


def test_ctrl_c_in_the_final_test_resumes(capfd, tmp_path, data, monkeypatch):
    from trainer import commands
    original = commands.evaluate
    monkeypatch.setattr(commands, "evaluate", interrupt)
    code, out, err = cli(capfd, *train_argv(tmp_path, data))
    assert code == 130 and f"resume with: {shlex.quote(sys.executable)} " in err
    (run,) = (tmp_path / "mnist_sqvae_gaussian_1").iterdir()
    assert records(run, "test") == []
    monkeypatch.setattr(commands, "evaluate", original)
    assert cli(capfd, "-c", CONFIG, "--resume", run)[0] == 0
    assert len(records(run, "test")) == 1


def test_non_finite_loss_at_the_first_step_promises_no_checkpoint(capfd, tmp_path, data,
                                                                  monkeypatch):
    from networks.sqvae import GaussianSQVAE
    original = GaussianSQVAE.reconstruction_terms

    def poisoned(self, x_hat, x):
        terms = original(self, x_hat, x)
        terms["loss_rec"] = terms["loss_rec"] * float("nan")
        return terms

    monkeypatch.setattr(GaussianSQVAE, "reconstruction_terms", poisoned)
    line = fails(capfd, *train_argv(tmp_path, data), code=1)
    assert "step 1 " in line and line.endswith("no checkpoint was written before it")


def test_a_run_in_its_own_path_specific_resumes_and_another_experiment_is_refused(
        capfd, tmp_path, data):
    # path_specific says where the folder went, not what was trained: the plain resume
    # command (the one a stopped run prints) must continue it.
    assert cli(capfd, *train_argv(tmp_path, data, "path_specific", "my_runs/"))[0] == 0
    (run,) = (tmp_path / "my_runs").iterdir()
    code, _, err = cli(capfd, "-c", CONFIG, "--resume", run, "train.epoch_max", "2")
    assert code == 0, err
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 6]
    line = fails(capfd, "-c", "mnist_vqvae.yaml", "--resume", run, "train.epoch_max", "2")
    assert "different experiment (model.name = 'GaussianSQVAE'" in line
