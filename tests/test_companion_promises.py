"""The companion commands and the layers keep main.py's promises (issue 30).

* No output of any command replaces a special file: a FIFO, a device or a link to one is
  written in place as a stream where the user named it (``trainer.compare``'s ``--csv``,
  ``--report``, ``--curves``), and refused in one line inside a run folder (``-ts`` with
  ``--report``, ``--encode``, ``--sample``, ``--resume``) and as ``import --to``.
* A file with more than one hard link in a run folder is refused like a symbolic link.
* YAML aliases are refused wherever YAML is read, and no message repeats user input
  without a bound.
* ``trainer.release import`` writes only under ``--to`` or ``path``.
* Wrong types in what others hand us are one line and exit 2.

Special files are FIFOs made in tmp_path and links to /dev/null (the real /dev is only
read: its file types are checked before and after).
"""
import contextlib
import json
import math
import os
import re
import select
import shutil
import signal
import stat
import threading
import time

import pytest
import torch

from networks import GaussianQuantizer, VectorQuantizer, VmfQuantizer
from networks.functional import HARD_BELOW
from tests.test_failures import (CONFIG, cli, cli_state, copy_run, data,  # noqa: F401
                                 error_line, fails, trained)
from trainer import compare, release
from util.io import FileLock, UnsafeLink, append_jsonl, atomic_write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
RELEASE_RUN = os.path.join(HERE, "release", "mnist_gauss_1_seed3")
PRECIOUS = b'{"someone else\'s": "record"}\n'


def is_fifo(path):
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def dev_null_intact():
    st = os.lstat("/dev/null")
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)


@contextlib.contextmanager
def fifo_reader(path):
    """A FIFO at `path` with a reader that collects what is written into it (opened
    non-blocking first, so a writer never waits and a failing test never hangs)."""
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    chunks, done = [], threading.Event()

    def read():
        while True:
            ready, _, _ = select.select([fd], [], [], 0.05)
            chunk = b""
            if ready:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    pass
            if chunk:
                chunks.append(chunk)
            elif done.is_set():
                return
            else:
                time.sleep(0.01)  # no writer yet: select reports the FIFO readable

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    received = []
    try:
        yield received
    finally:
        done.set()
        thread.join(10)
        os.close(fd)
        received.append(b"".join(chunks))


@pytest.fixture(autouse=True)
def no_hang():
    """A FIFO opened or read where it should have been refused would block for ever: fail
    after 60 s instead (the alarm's exception ends the command like any error)."""
    def expire(signum, frame):
        raise TimeoutError("blocked on a special file")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run_compare(capfd, *argv):
    code = compare.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


# ---------------------------------------------------------------- special files as outputs

@pytest.mark.parametrize("flag, start", [("--csv", b"run,model,"),
                                         ("--report", b"# Reproduction report"),
                                         ("--curves", b"\x89PNG")])
def test_compare_writes_into_a_fifo_in_place(capfd, tmp_path, trained, flag, start):
    target = tmp_path / "F"
    with fifo_reader(target) as received:
        code, out, err = run_compare(capfd, trained, flag, target)
    assert code == 0, err
    assert is_fifo(target)  # still the FIFO: written into, never replaced
    assert received[0].startswith(start)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("flag", ["--csv", "--report", "--curves"])
def test_compare_writes_through_a_link_to_dev_null_and_leaves_both(capfd, tmp_path, trained,
                                                                  flag):
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    assert dev_null_intact()
    code, out, err = run_compare(capfd, trained, flag, link)
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == "/dev/null"
    assert dev_null_intact()


def test_compare_into_a_regular_file_still_replaces_it_whole(capfd, tmp_path, trained):
    target = tmp_path / "t.csv"
    target.write_bytes(b"old" * 10000)
    code, _, err = run_compare(capfd, trained, "--csv", target)
    assert code == 0, err
    assert target.read_bytes().startswith(b"run,model,")


def test_atomic_write_refuses_a_special_file_unless_told_to_stream(tmp_path):
    fifo = tmp_path / "F"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeLink, match="is a FIFO"):
        atomic_write_bytes(str(fifo), b"data")
    assert is_fifo(fifo)
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    with pytest.raises(UnsafeLink, match="symbolic link"):
        atomic_write_bytes(str(link), b"data")
    atomic_write_bytes(str(link), b"data", stream_special=True)
    assert link.is_symlink() and dev_null_intact()
    with fifo_reader(tmp_path / "G") as received:
        atomic_write_bytes(str(tmp_path / "G"), b"through the pipe", stream_special=True)
    assert received[0] == b"through the pipe" and is_fifo(tmp_path / "G")


# A run folder's outputs: each name, and the command that writes it.
RUN_OUTPUTS = [("report.png", ["-ts", "{run}", "--report"]),
               ("report_codebook.png", ["-ts", "{run}", "--report"]),
               ("codes_test.npz", ["-ts", "{run}", "--encode", "test"]),
               ("samples.png", ["-ts", "{run}", "--sample", "2"]),
               ("codes_samples.npz", ["-ts", "{run}", "--sample", "2"]),
               ("metrics.jsonl", ["-ts", "{run}"]),
               ("best.pt", ["--resume", "{run}", "train.epoch_max", "2"]),
               (".writer.lock", ["--resume", "{run}", "train.epoch_max", "2"])]


def run_argv(command, run, data):
    return ["-c", CONFIG, *[str(run) if a == "{run}" else a for a in command],
            "path_dataset", str(data)]


@pytest.mark.parametrize("name, command", RUN_OUTPUTS)
def test_a_fifo_at_a_run_folder_output_is_refused_and_kept(capfd, tmp_path, trained, data,
                                                           name, command):
    run = copy_run(trained, tmp_path)
    if (run / name).exists():
        (run / name).unlink()
    os.mkfifo(run / name)
    line = fails(capfd, *run_argv(command, run, data))
    assert f"{run / name} is a FIFO (named pipe), not a regular file" in line
    assert is_fifo(run / name)


@pytest.mark.parametrize("flag", ["--report", "--encode"])
def test_a_link_to_dev_null_in_a_run_folder_is_refused(capfd, tmp_path, trained, data, flag):
    run = copy_run(trained, tmp_path)
    name = "report.png" if flag == "--report" else "codes_test.npz"
    (run / name).symlink_to("/dev/null")
    command = ["-ts", "{run}", flag] + (["test"] if flag == "--encode" else [])
    line = fails(capfd, *run_argv(command, run, data))
    assert f"{run / name} is a symbolic link (to /dev/null)" in line
    assert (run / name).is_symlink() and dev_null_intact()


@pytest.fixture
def release_copy(tmp_path):
    run = tmp_path / "release_run"
    shutil.copytree(RELEASE_RUN, run)
    return run


@pytest.mark.parametrize("kind", ["fifo", "dev_null_link"])
def test_import_to_a_special_file_is_refused_and_kept(capfd, tmp_path, release_copy, kind):
    target = tmp_path / "dest"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/null")
    code = release.main(["import", str(release_copy), "--to", str(target)])
    err = capfd.readouterr().err
    assert code == 2
    assert "already exists" in error_line(err)
    assert is_fifo(target) if kind == "fifo" else target.is_symlink() and dev_null_intact()


# ---------------------------------------------------------------- hard links in a run folder

HARD_LINKED = [("metrics.jsonl", ["-ts", "{run}"]),
               (".writer.lock", ["--resume", "{run}", "train.epoch_max", "2"]),
               (".metrics.jsonl.lock", ["-ts", "{run}"]),
               ("best.pt", ["-ts", "{run}", "--report"]),
               ("current.pt", ["--resume", "{run}", "train.epoch_max", "2"]),
               ("config.yaml", ["--resume", "{run}", "train.epoch_max", "2"])]


@pytest.mark.parametrize("name, command", HARD_LINKED)
def test_a_hard_link_in_a_run_folder_is_refused_like_a_symbolic_link(capfd, tmp_path,
                                                                     trained, data, name,
                                                                     command):
    run = copy_run(trained, tmp_path)
    outside = tmp_path / "outside" / name.lstrip(".")
    outside.parent.mkdir()
    if (run / name).exists():
        shutil.copyfile(run / name, outside)
        (run / name).unlink()
    else:
        outside.write_bytes(b"")
    os.link(outside, run / name)  # as `ln OUTSIDE RUN/NAME` or a `cp -al` backup makes it
    before = outside.read_bytes()
    line = fails(capfd, *run_argv(command, run, data))
    assert f"{run / name} has 2 hard links" in line and "replace it with a copy" in line
    assert outside.read_bytes() == before
    assert os.stat(outside).st_nlink == 2


def test_a_cp_al_backup_is_not_corrupted_by_ts(capfd, tmp_path, trained, data):
    run = copy_run(trained, tmp_path)
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in os.listdir(run):
        if (run / name).is_file():
            os.link(run / name, backup / name)
    before = {n: (backup / n).read_bytes() for n in os.listdir(backup)}
    fails(capfd, *run_argv(["-ts", "{run}"], run, data))
    assert {n: (backup / n).read_bytes() for n in os.listdir(backup)} == before


def test_append_and_lock_refuse_a_hard_link_even_past_the_check(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(PRECIOUS)
    folder = tmp_path / "run"
    folder.mkdir()
    os.link(outside, folder / "metrics.jsonl")
    with pytest.raises(UnsafeLink, match="has 2 hard links"):
        append_jsonl(str(folder / "metrics.jsonl"), [{"split": "test"}])
    os.link(outside, folder / ".writer.lock")
    with pytest.raises(UnsafeLink, match="has 3 hard links"):
        FileLock(str(folder / ".writer.lock")).acquire()
    assert outside.read_bytes() == PRECIOUS
    os.mkfifo(folder / ".other.lock")
    with pytest.raises(UnsafeLink, match="is a FIFO"):
        FileLock(str(folder / ".other.lock")).acquire()


# ---------------------------------------------------------------- YAML aliases, bounded messages

def alias_bomb(width=10, depth=8):
    """Nested anchors `width` wide and `depth` deep under train.lr: half a kilobyte of YAML
    that expands to width ** depth values."""
    lines = ["train:", "  lr:", "    - &a0 [" + ", ".join(["1.0"] * width) + "]"]
    for level in range(1, depth):
        lines.append(f"    - &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_an_experiment_file_is_refused_at_once(capfd, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 1000
    started = time.monotonic()
    line = fails(capfd, "-c", bomb)
    assert time.monotonic() - started < 10
    assert str(bomb) in line and "YAML alias at line 4" in line and len(line) < 300


def test_an_alias_bomb_in_a_run_folder_config_is_refused_under_ts(capfd, tmp_path, trained,
                                                                 data):
    run = copy_run(trained, tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(alias_bomb() + text.replace("train:\n", "train_:\n", 1))
    line = fails(capfd, "-c", CONFIG, "-ts", run, "path_dataset", data)
    assert str(run / "config.yaml") in line and "YAML alias" in line and len(line) < 300


def test_an_alias_bomb_under_model_name_is_refused_by_compare(capfd, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    text = (run / "config.yaml").read_text()
    bomb = alias_bomb().replace("train:\n  lr:", "model:\n  name:")
    (run / "config.yaml").write_text(bomb + text.replace("model:\n", "model_:\n", 1))
    code, out, err = run_compare(capfd, run)
    assert code == 2 and out == ""
    assert "YAML alias" in error_line(err) and len(err) < 400


def test_a_value_of_the_wrong_type_is_shown_bounded(capfd, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("train:\n  lr: [" + ", ".join(["[1, 2, 3, 4, 5, 6]"] * 5000) + "]\n")
    line = fails(capfd, "-c", big)
    assert "'train.lr' needs a float" in line and len(line) < 300
    huge_int = tmp_path / "int.yaml"
    huge_int.write_text("train:\n  bs: " + "7" * 5000 + "\n")
    line = fails(capfd, "-c", huge_int)
    assert str(huge_int) in line and len(line) < 400


# ---------------------------------------------------------------- compare: what others wrote

def fake_run(folder, records, config="model:\n  name: VQVAE\ndataset:\n  name: MNIST\n"):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.mark.parametrize("record, key", [
    ({"split": "train", "epoch": 1, "seconds": "fast"}, "seconds"),
    ({"split": "train", "epoch": [1], "seconds": 1.0}, "epoch"),
    ({"split": "test", "mse": "oops"}, "mse"),
    ({"split": "test", "mse": 1.0, "codes_used": {"a": 1}}, "codes_used"),
    ({"split": "prior_test", "nll": [1.0]}, "nll")])
def test_compare_records_of_the_wrong_type_are_one_line(capfd, tmp_path, record, key):
    records = [{"split": "train", "epoch": 1, "seconds": 1.0}, {"split": "test", "mse": 1.0}]
    run = fake_run(tmp_path / "exp" / "run", records + [record])
    code, out, err = run_compare(capfd, run)
    assert code == 2 and out == ""
    line = error_line(err)
    assert str(run / "metrics.jsonl") in line and f"its {key} is" in line


def test_compare_takes_a_null_training_time_as_none(capfd, tmp_path):
    run = fake_run(tmp_path / "exp" / "run", [{"split": "train", "epoch": 1, "seconds": None},
                                              {"split": "test", "mse": 1.0}])
    code, out, err = run_compare(capfd, run)
    assert code == 0 and err == ""


def test_compare_shows_config_values_of_any_shape_bounded(capfd, tmp_path):
    name = "[" + ", ".join(["[1, 2, 3]"] * 3000) + "]"
    run = fake_run(tmp_path / "exp" / "run", [{"split": "test", "mse": 1.0}],
                   config=f"model:\n  name: {name}\ndataset:\n  name: MNIST\n")
    code, out, err = run_compare(capfd, run)
    assert code == 0 and len(out) < 2000


def test_compare_notes_that_are_not_text_are_one_line(capfd, tmp_path):
    run = fake_run(tmp_path / "exp" / "run", [{"split": "test", "mse": 1.0}])
    notes = tmp_path / "notes.bin"
    notes.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    code, out, err = run_compare(capfd, run, "--report", tmp_path / "r.md", "--notes", notes)
    assert code == 2 and "not UTF-8 text" in error_line(err)
    assert not (tmp_path / "r.md").exists()


# ---------------------------------------------------------------- release import: where it writes

def with_configs_json(release_copy, **changes):
    path = release_copy / "configs.json"
    saved = json.loads(path.read_text())
    saved.update(changes)
    path.write_text(json.dumps(saved))


@pytest.mark.parametrize("specific", ["{elsewhere}/", "../../../../../../{elsewhere}/x/",
                                      "a/../../x/"])
def test_import_writes_only_under_path_whatever_configs_json_says(capfd, tmp_path,
                                                                  release_copy, monkeypatch,
                                                                  specific):
    elsewhere = tmp_path / "elsewhere"
    root = tmp_path / "checkpoints"
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(root))
    with_configs_json(release_copy, path_specific=specific.format(
        elsewhere=str(elsewhere).lstrip("/") if specific.startswith("..") else elsewhere))
    code = release.main(["import", str(release_copy)])
    out, err = capfd.readouterr()
    assert code == 0, err
    (dest,) = [line.split(" as ", 1)[1] for line in out.splitlines() if " as " in line]
    assert os.path.commonpath([dest, str(root)]) == str(root)
    assert not elsewhere.exists()
    assert not (tmp_path / "x").exists()


def test_import_keeps_a_path_specific_below_path(capfd, tmp_path, release_copy, monkeypatch):
    root = tmp_path / "checkpoints"
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(root))
    assert release.main(["import", str(release_copy)]) == 0
    assert (root / "mnist_sqvae_gaussian_1" / "release_run" / "best.pt").is_file()


@pytest.mark.parametrize("section, value", [("train", "bs lr"), ("network", 5),
                                            ("quantization", [1, 2])])
def test_import_of_a_section_that_is_no_mapping_is_one_line(capfd, tmp_path, release_copy,
                                                            section, value):
    with_configs_json(release_copy, **{section: value})
    code = release.main(["import", str(release_copy), "--to", str(tmp_path / "dest")])
    line = error_line(capfd.readouterr().err)
    assert code == 2 and f"its {section} is {value!r}, not a section" in line
    assert not (tmp_path / "dest").exists()


def test_import_to_a_path_below_a_file_says_which_file(capfd, tmp_path, release_copy):
    blocker = tmp_path / "FILE"
    blocker.write_bytes(b"x")
    code = release.main(["import", str(release_copy), "--to", str(blocker / "sub" / "run")])
    line = error_line(capfd.readouterr().err)
    assert code == 2 and f"{blocker} is a file, not a folder" in line
    assert "already exists" not in line and blocker.read_bytes() == b"x"


# ---------------------------------------------------------------- the layers

LAYERS = {
    "gaussian_1": lambda **kw: GaussianQuantizer(3, 5, "gaussian_1", **kw),
    "gaussian_4": lambda **kw: GaussianQuantizer(3, 5, "gaussian_4", **kw),
    "vmf": lambda **kw: VmfQuantizer(3, 5, **kw),
    "vq": lambda **kw: VectorQuantizer(3, 5, **kw),
}


def forward(kind, layer, z, **kw):
    return layer(z, torch.zeros_like(z), **kw) if kind == "gaussian_4" else layer(z, **kw)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("argument, value, message", [
    ("codebook_size", 0, "codebook_size must be a whole number of at least 1, got 0"),
    ("codebook_size", -1, "codebook_size must be a whole number of at least 1, got -1"),
    ("codebook_size", 2.5, "codebook_size must be a whole number of at least 1, got 2.5"),
    ("dim", 0, "dim must be a whole number of at least 1, got 0"),
    ("temperature_init", -1.0, "temperature_init must be a finite number of at least 0"),
    ("temperature_decay", float("nan"), "temperature_decay must be a finite number"),
    ("temperature_min", float("inf"), "temperature_min must be a finite number"),
])
def test_a_constructor_argument_out_of_range_is_a_value_error_at_once(kind, argument, value,
                                                                      message):
    if argument in ("dim", "codebook_size"):
        dim, size = (value, 5) if argument == "dim" else (3, value)
        make = {"gaussian_1": lambda: GaussianQuantizer(dim, size),
                "gaussian_4": lambda: GaussianQuantizer(dim, size, "gaussian_4"),
                "vmf": lambda: VmfQuantizer(dim, size),
                "vq": lambda: VectorQuantizer(dim, size)}[kind]
    elif kind == "vq":
        pytest.skip("the nearest-code layer has no temperature")
    else:
        make = lambda: LAYERS[kind](**{argument: value})  # noqa: E731
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: VectorQuantizer(3, 5, init="foo"), "unknown init 'foo'"),
    (lambda: VectorQuantizer(3, 5, beta=-1), "beta must be a finite number of at least 0"),
    (lambda: VectorQuantizer(3, 5, decay=1.0), "decay must be in [0, 1)"),
    (lambda: VectorQuantizer(3, 5, eps=0.0), "eps above 0"),
    (lambda: GaussianQuantizer(3, 5, log_param_q_init=float("nan")),
     "log_param_q_init must be a finite number"),
    (lambda: GaussianQuantizer(3, 5, "x" * 10_000), "unknown variance 'xxx"),
])
def test_other_bad_constructor_arguments(make, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        make()
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("kind", list(LAYERS))
def test_complex_input_is_refused(kind):
    layer = LAYERS[kind]()
    with pytest.raises(ValueError, match="z is complex"):
        forward(kind, layer, torch.randn(2, 3, 4, dtype=torch.complex64))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("mode", ["train", "deterministic", "stochastic"])
def test_a_batch_of_0_gives_a_zero_loss_and_empty_outputs(kind, mode):
    layer = LAYERS[kind]()
    z = torch.randn(0, 3, 4, requires_grad=True)
    z_q, aux = forward(kind, layer, z, mode=mode)
    assert z_q.shape == (0, 3, 4) and aux["codes"].shape == (0, 4)
    assert aux["loss"].item() == 0.0 and math.isfinite(aux["perplexity"].item())
    aux["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("codes, message", [
    (torch.tensor([[0, -1]]), r"in \[0, 5\), got -1 to 0"),
    (torch.tensor([[0, 5]]), r"in \[0, 5\), got 0 to 5"),
    (torch.tensor([[1.7, 0.0]]), "must be integers, got torch.float32"),
    (torch.tensor([[True, False]]), "must be integers, got torch.bool"),
])
def test_lookup_validates_its_indices(codes, message):
    layer = VectorQuantizer(3, 5)
    with pytest.raises(ValueError, match=message):
        layer.lookup(codes)
    assert layer.lookup(torch.tensor([[0, 4]])).shape == (1, 3, 2)


@pytest.mark.parametrize("step", [-1, -1e8, float("nan"), float("inf"), "10", True])
def test_anneal_refuses_a_step_that_is_not_a_finite_number_at_least_0(step):
    layer = GaussianQuantizer(3, 5)
    with pytest.raises(ValueError, match="step must be a finite number of at least 0"):
        layer.anneal(step)
    assert layer.temperature.item() == 1.0


@pytest.mark.parametrize("kind", ["gaussian_1", "gaussian_4", "vmf"])
@pytest.mark.parametrize("how", ["anneal_1e12", "init_0", "default_9e6", "denormal"])
def test_at_a_temperature_of_0_the_layer_is_the_hard_argmax_never_nan(kind, how):
    layer = LAYERS[kind](temperature_init=0.0) if how == "init_0" else LAYERS[kind]()
    if how == "anneal_1e12":
        layer.anneal(1e12)
    elif how == "default_9e6":
        layer.anneal(9_000_000)  # exp(-90): a float32 subnormal, as the default schedule
        assert 0 <= layer.temperature.item() < HARD_BELOW  # 0 where subnormals flush
    elif how == "denormal":
        layer.temperature.fill_(1e-44)
    layer.train()
    z = torch.randn(2, 3, 4, requires_grad=True)
    torch.manual_seed(0)
    z_q, aux = forward(kind, layer, z)
    assert torch.isfinite(z_q).all() and torch.isfinite(aux["loss"])
    aux["loss"].backward()
    assert torch.isfinite(z.grad).all()
    # The argmax of the perturbed logits: z_q is exactly one code vector per position.
    codes = layer.code_vectors().detach()
    rows = z_q.detach().movedim(1, -1).reshape(-1, 3)
    distances = torch.cdist(rows, codes)
    assert (distances.min(1).values < 1e-6).all()


# ---------------------------------------------------------------- one line where tracebacks were

@pytest.mark.parametrize("seed", ["1180591620717411303424", str(2**64), str(-2**63 - 1)])
def test_a_seed_beyond_torchs_range_is_one_line(capfd, seed):
    line = fails(capfd, "-c", CONFIG, "--seed", seed, "train.epoch_max", "1")
    assert "--seed needs a whole number from -2**63 to 2**64 - 1" in line


def test_a_full_disk_when_tensorboard_opens_its_file_is_one_line_naming_it(capfd, tmp_path,
                                                                          data, monkeypatch):
    from tensorboard.summary.writer import record_writer

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    # As in a plain process (pytest catches threads' exceptions itself): the writer thread's
    # traceback would go to stderr, and fails() sees any line beyond the one.
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    import main
    from tests.test_failures import train_argv
    code = main.run([str(a) for a in train_argv(tmp_path / "runs", data)])
    for thread in threading.enumerate():  # its traceback would come as the thread ends
        if type(thread).__name__ == "_AsyncWriterThread":
            thread.join(10)
    assert code == 1
    line = error_line(capfd.readouterr().err)
    (run,) = (tmp_path / "runs" / "mnist_sqvae_gaussian_1").iterdir()
    assert line.startswith(f"error: cannot write {run / 'tensorboard'}: No space left on device")
    # No current.pt was written yet: resume would refuse, so the line does not suggest it.
    assert not (run / "current.pt").exists()
    assert line.endswith("then run the command again (no checkpoint was written, nothing to "
                         "resume)")


def test_the_free_memory_of_the_cpu_honours_ulimit_v(monkeypatch):
    import resource

    from util import device as devices
    unlimited = devices.free_memory("cpu")
    assert devices.address_space_left() is None or unlimited <= devices.address_space_left()
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (used + 2**20, resource.RLIM_INFINITY)
                        if which == resource.RLIMIT_AS else (resource.RLIM_INFINITY,) * 2)
    assert devices.free_memory("cpu") <= 2**20 + 2**24  # what is left under the limit


@pytest.mark.parametrize("error", [MemoryError(),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. "
                                                "DefaultCPUAllocator: can't allocate memory: "
                                                "you tried to allocate 25165824000 bytes.")])
def test_an_allocation_the_machine_refuses_is_one_line_exit_1(capfd, tmp_path, data,
                                                              monkeypatch, error):
    from tests.test_failures import train_argv
    from trainer.loop import Trainer

    def refused(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Trainer, "fit", refused)
    line = fails(capfd, *train_argv(tmp_path / "runs", data), code=1)
    assert "out of memory on cpu (train.bs 8): lower train.bs or free memory" in line


SIGNAL_AT_IMPORT = """
import os, runpy, signal, sys
class Stop:
    def find_spec(self, name, path=None, target=None):
        if name == "trainer.release_format":
            os.kill(os.getpid(), getattr(signal, {sig!r}))
        return None
sys.meta_path.insert(0, Stop())
sys.argv = ["-m", "nothing"]  # as `python -m` has it while the package imports
runpy._run_module_as_main({module!r})
"""


@pytest.mark.parametrize("module", ["trainer.compare", "trainer.release"])
@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"),
                                             ("SIGTERM", 143, "SIGTERM")])
def test_a_signal_while_a_companion_command_imports_is_one_line(module, sig, code, word):
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_IMPORT.format(sig=sig, module=module)],
                          cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.splitlines() == [f"{word} during start-up; nothing was written"]


# ---------------------------------------------------------------- smaller items

def test_gpu_check_with_an_unknown_setting_is_one_line_exit_2():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "benchmarks",
                                                        "gpu_check.py"), "--only", "bogus"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unknown setting bogus; choose from default")


def test_the_torn_line_warning_is_printed_once(capfd, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"split": "te')
    code, out, err = run_compare(capfd, run, "--csv", tmp_path / "t.csv",
                                 "--curves", tmp_path / "c.png")
    assert code == 0
    assert err.splitlines() == [f"warning: {run / 'metrics.jsonl'}: skipping a torn last line "
                                "(its writer was stopped mid-line)"]


@pytest.mark.parametrize("runs, legend", [(12, True), (1000, False)])
def test_curves_of_many_runs_leave_the_legend_out(runs, legend):
    from util.figures import draw_learning_curves, new_figure
    records = [{"split": "val", "epoch": e, "mse_pixel": 0.1 / e} for e in (1, 2)]
    fig = new_figure(15, 8)
    titles = draw_learning_curves(fig, [(f"run {i}", records) for i in range(runs)])
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert (ax.get_legend() is not None) == legend
    assert titles == ["Validation MSE per pixel"]
    assert ax.get_title().endswith(f"({runs} runs)") != legend


def test_a_dataset_file_that_cannot_be_read_is_not_called_corrupt(capfd, tmp_path,
                                                                  monkeypatch):
    import builtins

    from tests.fixtures import write_mnist
    data = tmp_path / "datasets"  # its own: nothing decoded from it is cached yet
    write_mnist(str(data), n_train=60, n_test=20)
    refused = str(data / "MNIST" / "raw" / "train-images-idx3-ubyte")
    real_open = builtins.open

    def guarded(file, *args, **kwargs):  # chmod 000 does not stop root: refuse by name
        if os.fspath(file) == refused:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    from tests.test_failures import train_argv
    line = fails(capfd, *train_argv(tmp_path / "runs", data))
    assert f"cannot read {refused}: Permission denied; make it readable" in line
    assert "corrupt;" not in line and "download it again" not in line
    assert not (tmp_path / "runs").exists()  # and a dataset error leaves no folder


def test_the_temporary_file_of_a_first_save_killed_goes_with_the_next_resume(capfd, tmp_path,
                                                                           trained, data):
    run = copy_run(trained, tmp_path)
    (run / "current.pt").unlink()
    (run / "best.pt").unlink()
    left = run / ".current.pt.k1ll3d.tmp"  # what SIGKILL in the first save leaves
    left.write_bytes(b"x" * 1000)
    line = fails(capfd, "-c", CONFIG, "--resume", run, "path_dataset", data)
    assert f"{run / 'current.pt'} does not exist" in line
    assert not left.exists()
