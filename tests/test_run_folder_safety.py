"""A run folder from someone else touches nothing outside it, and the last tracebacks go.

Run folders come from other people (the authors' release, a colleague, a download): a
symbolic link planted at a name the tool writes is refused before anything is written, and
the write primitives themselves never follow one. Deeply nested files, interruptions at
start-up and SIGTERM end in one line with the right exit status; a finished run is never
tested twice; the prior's "continue" command works as printed.

Most cases run the CLI in this process (tests/test_failures.py's helpers and its tiny
trained run); the start-up interruption and the helper CLIs also run as real processes.
"""
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import main
from tests.fixtures import write_cifar10
from tests.test_failures import (CONFIG, REPO, SMALL_NET, cli, cli_state, copy_run,  # noqa: F401
                                 data, error_line, fails, metrics_bytes, records,
                                 train_argv, trained)
from util.codes import load_codes
from util.io import FileLock, UnsafeLink, append_jsonl, atomic_write_bytes, read_jsonl

ENV = {**os.environ, "SQVAE_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"}
PRECIOUS = b'{"someone else\'s": "record"}\n{"an unfinished line'


def outside_file(tmp_path, name="victim"):
    path = tmp_path / "outside" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(PRECIOUS)
    return path


def tree(folder, skip=()):
    """Every file under `folder` with its bytes (links as their target text), but `skip`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            if os.path.relpath(path, folder) in skip:
                continue
            out[os.path.relpath(path, folder)] = (
                ("link", os.readlink(path)) if os.path.islink(path)
                else open(path, "rb").read())
    return out


# ---------------------------------------------------------------- links in a run folder

# Every name a command writes, and a command that writes it.
LINKED_NAMES = ["metrics.jsonl", ".metrics.jsonl.lock", ".writer.lock", "config.yaml",
                "best.pt", "current.pt", "prior.pt", "prior_current.pt",
                "reconstructions_best.png", "reconstructions_current.png", "samples.png",
                "codes_test.npz", "codes_samples.npz", "report.png", "report_curves.png"]
COMMANDS = {
    "-ts": ["-ts", "{run}"],
    "--resume": ["--resume", "{run}", "train.epoch_max", "2"],
    "--prior": ["-ts", "{run}", "--prior", "prior.epoch_max", "1"],
    "--sample": ["-ts", "{run}", "--sample", "2"],
    "--encode": ["-ts", "{run}", "--encode", "test"],
    "--report": ["-ts", "{run}", "--report"],
}


def unlocked_copy(trained, tmp_path):
    """A copy of the trained run whose writer lock file is empty: taking the lock would
    write this process's PID into it, which the tests can then see."""
    run = copy_run(trained, tmp_path)
    (run / ".writer.lock").write_bytes(b"")
    return run


def run_command(name, run, data):
    return ["-c", CONFIG, *[str(run) if a == "{run}" else a for a in COMMANDS[name]],
            "path_dataset", str(data)]


@pytest.mark.parametrize("name", LINKED_NAMES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_link_at_any_written_name_refuses_the_folder(capfd, tmp_path, trained, data, name,
                                                       command):
    run = unlocked_copy(trained, tmp_path)
    victim = outside_file(tmp_path)
    if (run / name).exists():
        (run / name).unlink()
    (run / name).symlink_to(victim)
    before = tree(run)
    line = fails(capfd, *run_command(command, run, data))
    assert f"{run / name} is a symbolic link (to {victim})" in line
    assert "replace the link with a copy of the file, or remove it" in line
    assert victim.read_bytes() == PRECIOUS
    assert tree(run) == before  # nothing written, not even the writer lock's PID


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_linked_tensorboard_folder_or_a_link_inside_it_is_refused(capfd, tmp_path, trained,
                                                                    data, command):
    run = copy_run(trained, tmp_path)
    outside = tmp_path / "outside_tb"
    outside.mkdir()
    (outside / "events.out.tfevents.1").write_bytes(PRECIOUS)
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").symlink_to(outside, target_is_directory=True)
    line = fails(capfd, *run_command(command, run, data))
    assert f"{run / 'tensorboard'} is a symbolic link" in line
    (run / "tensorboard").unlink()
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.2").symlink_to(outside / "events.out.tfevents.1")
    line = fails(capfd, *run_command(command, run, data))
    assert f"{run / 'tensorboard' / 'events.out.tfevents.2'} is a symbolic link" in line
    assert tree(outside) == {"events.out.tfevents.1": PRECIOUS}


def test_a_folder_with_links_at_every_written_name_changes_nothing_outside(capfd, tmp_path,
                                                                           trained, data):
    run = copy_run(trained, tmp_path)
    victims = {}
    for name in LINKED_NAMES:
        victims[name] = outside_file(tmp_path, name)
        if (run / name).exists():
            (run / name).unlink()
        (run / name).symlink_to(victims[name])
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").symlink_to(tmp_path / "outside", target_is_directory=True)
    outside_before = tree(tmp_path / "outside")
    for command in COMMANDS:
        line = fails(capfd, *run_command(command, run, data))
        assert "is a symbolic link" in line
    assert tree(tmp_path / "outside") == outside_before


def test_writes_never_follow_a_link_even_past_the_check(tmp_path):
    """The primitives are safe on their own: a link that appears after the folder was
    checked is still not written through."""
    victim = outside_file(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UnsafeLink, match="metrics.jsonl is a symbolic link"):
        append_jsonl(str(folder / "metrics.jsonl"), [{"split": "test"}])
    (folder / ".writer.lock").symlink_to(victim)
    with pytest.raises(UnsafeLink, match=".writer.lock is a symbolic link"):
        FileLock(str(folder / ".writer.lock")).acquire()
    # A dangling link: following it would create the file it names.
    (folder / ".other.lock").symlink_to(tmp_path / "outside" / "created")
    with pytest.raises(UnsafeLink):
        FileLock(str(folder / ".other.lock")).acquire()
    assert not (tmp_path / "outside" / "created").exists()
    # An atomic write replaces a link with a file of its own; the target stays as it was.
    (folder / "best.pt").symlink_to(victim)
    atomic_write_bytes(str(folder / "best.pt"), b"new")
    assert not (folder / "best.pt").is_symlink() and (folder / "best.pt").read_bytes() == b"new"
    assert victim.read_bytes() == PRECIOUS


def test_temporary_files_of_a_killed_writer_are_removed_under_the_lock(capfd, tmp_path,
                                                                       trained, data):
    run = copy_run(trained, tmp_path)
    victim = outside_file(tmp_path)
    left = [run / ".best.pt.k1ll3d_1.tmp", run / ".current.pt.abcd1234.tmp",
            run / ".reconstructions_current.png.zz9_0.tmp", run / ".config.yaml.q.tmp"]
    for path in left:
        path.write_bytes(b"x" * 1000)
    (run / ".prior.pt.link1234.tmp").symlink_to(victim)  # removed as a link, not followed
    # Written without the writer lock (by -ts, --sample): a live one may be writing it.
    kept = run / ".codes_test.npz.live0000.tmp"
    kept.write_bytes(b"y")
    code, out, err = cli(capfd, "-c", CONFIG, "--resume", run, "train.epoch_max", "2")
    assert code == 0, err
    assert not any(p.exists() or p.is_symlink() for p in [*left, run / ".prior.pt.link1234.tmp"])
    assert kept.read_bytes() == b"y" and victim.read_bytes() == PRECIOUS


# ---------------------------------------------------------------- deeply nested input

DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_YAML = "train:\n" + "".join("  " * i + "a:\n" for i in range(1, 3000))


def release_folder(tmp_path, configs_json):
    folder = tmp_path / "release_run"
    folder.mkdir()
    (folder / "configs.json").write_text(configs_json)
    return folder


@pytest.mark.parametrize("where", ["config.yaml", "metrics.jsonl"])
@pytest.mark.parametrize("flag", ["-ts", "--resume"])
def test_deeply_nested_run_files_are_one_line_exit_2(capfd, tmp_path, trained, data, where,
                                                     flag):
    run = copy_run(trained, tmp_path)
    if where == "config.yaml":
        (run / where).write_text(DEEP_YAML)
    else:
        with open(run / where, "a") as f:
            f.write(DEEP_JSON + "\n" + '{"split": "x"}\n')
    before = tree(run, skip=(".writer.lock",))
    line = fails(capfd, "-c", CONFIG, flag, run, "path_dataset", data)
    assert str(run / where) in line and "nested too deeply" in line
    assert tree(run, skip=(".writer.lock",)) == before


def test_deeply_nested_release_config_is_one_line_exit_2(capfd, tmp_path):
    folder = release_folder(tmp_path, DEEP_JSON)
    line = fails(capfd, "-c", CONFIG, "-ts", folder)
    assert str(folder / "configs.json") in line and "nested too deeply" in line
    from trainer import release
    assert release.main(["import", str(folder), "--to", str(tmp_path / "ours")]) == 2
    assert "nested too deeply" in error_line(capfd.readouterr().err)
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("where", ["config.yaml", "configs.json", "metrics.jsonl"])
def test_deeply_nested_files_in_compare_are_one_line_exit_2(capfd, tmp_path, trained, where):
    from trainer import compare
    run = copy_run(trained, tmp_path)
    if where == "configs.json":
        (run / "config.yaml").unlink()
        (run / where).write_text(DEEP_JSON)
    elif where == "config.yaml":
        (run / where).write_text(DEEP_YAML)
    else:
        with open(run / where, "a") as f:
            f.write(DEEP_JSON + "\n")
    assert compare.main([str(run)]) == 2
    line = error_line(capfd.readouterr().err)
    assert str(run / where) in line and "nested too deeply" in line


# ---------------------------------------------------------------- the prior's settings

PRIOR_OPTS = ["prior.channels", "16", "prior.layers", "3", "prior.epoch_max", "3",
              "prior.bs", "16"]


def prior_records(run):
    return [r for r in read_jsonl(str(run / "metrics.jsonl")) if r["split"] == "prior_test"]


def test_the_printed_continue_command_works_as_printed(capfd, tmp_path, trained, data,
                                                       stop_prior_in_epoch_2):
    run = copy_run(trained, tmp_path)
    code, out, err = cli(capfd, "-c", CONFIG, "-ts", run, "--prior", "path_dataset", data,
                         *PRIOR_OPTS)
    assert code == 130, err
    line = err.strip().splitlines()[-1]
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[:2] == [sys.executable, str(REPO / "main.py")]
    assert command[2:6] == ["-c", CONFIG, "-ts", str(run)] and command[6] == "--prior"
    assert command[-len(PRIOR_OPTS):] == PRIOR_OPTS
    stop_prior_in_epoch_2()
    # The command as printed (in this process, for speed: main.run gets its arguments).
    code, out, err = cli(capfd, *command[2:])
    assert code == 0, err
    assert "continuing prior_current.pt after epoch 1" in out
    state = torch.load(run / "prior_current.pt", weights_only=True)
    assert state["settings"]["channels"] == 16 and state["settings"]["layers"] == 3
    assert len(prior_records(run)) == 1


def test_a_plain_prior_command_continues_with_the_stored_settings(capfd, tmp_path, trained,
                                                                  data, stop_prior_in_epoch_2):
    run = copy_run(trained, tmp_path)
    assert cli(capfd, "-c", CONFIG, "-ts", run, "--prior", "path_dataset", data,
               *PRIOR_OPTS)[0] == 130
    stop_prior_in_epoch_2()
    # An architecture the prior was not trained with is refused, naming the setting.
    line = fails(capfd, "-c", CONFIG, "-ts", run, "--prior", "path_dataset", data,
                 "prior.channels", "32")
    assert "prior.channels 16, not 32" in line and "drop the prior.channels override" in line
    # No overrides at all: the stored settings (3 epochs, 16 channels, 3 layers).
    code, out, err = cli(capfd, "-c", CONFIG, "-ts", run, "--prior", "path_dataset", data)
    assert code == 0, err
    assert "continuing prior_current.pt after epoch 1" in out
    assert prior_records(run)[-1]["prior_epochs"] == 3
    # A larger prior.epoch_max continues a finished prior.
    code, out, err = cli(capfd, "-c", CONFIG, "-ts", run, "--prior", "path_dataset", data,
                         "prior.epoch_max", "4")
    assert code == 0 and prior_records(run)[-1]["prior_epochs"] == 4, err


# ---------------------------------------------------------------- finished runs

def test_resume_of_a_finished_run_appends_nothing(capfd, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    before = tree(run, skip=(".writer.lock",))
    code, out, err = cli(capfd, "-c", CONFIG, "--resume", run)
    assert code == 0, err
    assert f"{run} is finished: trained 1 epoch (train.epoch_max 1) and tested" in out
    assert tree(run, skip=(".writer.lock",)) == before  # no second test record


def test_stopped_after_the_final_test_was_recorded_then_resumed_records_it_once(
        capfd, tmp_path, data, monkeypatch):
    from trainer import runs
    original = runs.append_metrics

    def stop_after_the_test_records(run_dir, new):
        original(run_dir, new)
        if any(r["split"] == "test" for r in new):
            raise KeyboardInterrupt  # as if killed between the write and the exit

    monkeypatch.setattr(runs, "append_metrics", stop_after_the_test_records)
    assert cli(capfd, *train_argv(tmp_path, data))[0] == 130
    monkeypatch.setattr(runs, "append_metrics", original)
    (run,) = (tmp_path / "mnist_sqvae_gaussian_1").iterdir()
    assert [r["split"] for r in records(run)][-2:] == ["test_stochastic", "test"]
    before = metrics_bytes(run)
    code, out, err = cli(capfd, "-c", CONFIG, "--resume", run)
    assert code == 0 and "is finished" in out, err
    assert metrics_bytes(run) == before
    assert len(records(run, "test")) == 1 and len(records(run, "test_stochastic")) == 1


# ---------------------------------------------------------------- interruptions

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="watches /proc/PID/maps")
def test_ctrl_c_during_start_up_imports_is_one_line_exit_130(tmp_path, data):
    """A real process, interrupted while it imports torch: once torch's library is mapped
    into it, and well before torch's Python modules have all loaded."""
    proc = subprocess.Popen([sys.executable, "main.py", *train_argv(str(tmp_path), str(data))],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/maps") as f:
            if "libtorch" in f.read():
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "interrupted during start-up; nothing was written\n", err


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_while_main_imports_is_one_line(capfd, monkeypatch, sig, code, word):
    def signalled(*_):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises here

    monkeypatch.setattr(main, "build_parser", signalled)
    handler = signal.getsignal(signal.SIGTERM)
    got, out, err = cli(capfd, "-c", CONFIG)
    assert got == code and err == f"{word} during start-up; nothing was written\n"
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


def send_sigterm(*_, **__):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)


def test_sigterm_during_ts_is_one_line_exit_143(capfd, tmp_path, trained, data, monkeypatch):
    from trainer import commands
    run = copy_run(trained, tmp_path)
    before = metrics_bytes(run)
    monkeypatch.setattr(commands, "evaluate", send_sigterm)
    code, out, err = cli(capfd, "-c", CONFIG, "-ts", run, "path_dataset", data)
    assert code == 143 and err == ("SIGTERM; the evaluation's records were not written, run "
                                   "-ts again\n")
    assert metrics_bytes(run) == before


def test_sigterm_during_prior_is_one_line_exit_143(capfd, tmp_path, trained, data,
                                                   monkeypatch):
    from trainer.prior import PriorTraining
    run = copy_run(trained, tmp_path)
    original = PriorTraining.train_epoch

    def term_in_epoch_2(self, codes):
        if self.epoch == 2:
            send_sigterm()
        return original(self, codes)

    monkeypatch.setattr(PriorTraining, "train_epoch", term_in_epoch_2)
    code, out, err = cli(capfd, "-c", CONFIG, "-ts", run, "--prior", "path_dataset", data,
                         *PRIOR_OPTS)
    assert code == 143 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"SIGTERM; continue with: {shlex.quote(sys.executable)} ")
    assert torch.load(run / "prior_current.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- batch size

def no_run_folder(root):
    # The experiment folder itself is made when `path` is checked for writing, up front.
    experiment = root / "mnist_sqvae_gaussian_1"
    return not experiment.exists() or not any(experiment.iterdir())


def test_a_batch_larger_than_the_split_is_refused_before_a_folder_exists(capfd, tmp_path,
                                                                        data):
    argv = train_argv(str(tmp_path / "runs"), str(data))
    argv[argv.index("train.bs") + 1] = "100000000"
    line = fails(capfd, *argv)
    assert "train.bs 100000000" in line and "more than the 50 training images" in line
    assert "set train.bs to at most 50" in line
    assert no_run_folder(tmp_path / "runs")


def test_a_batch_beyond_the_free_memory_is_refused_with_the_figure(capfd, tmp_path, data,
                                                                   monkeypatch):
    from configs import load_config
    from networks import build_model
    from trainer import commands
    cfg = load_config(CONFIG, SMALL_NET)
    per_image = commands.activation_bytes_per_image(cfg, build_model(cfg), "cpu")
    monkeypatch.setattr(commands, "free_memory", lambda device: 4 * per_image + 1)
    line = fails(capfd, *train_argv(str(tmp_path / "runs"), str(data)))
    assert (f"a batch of 8 images needs at least 0.0 GiB for its activations "
            f"({per_image / commands.MIB:.2f} MiB per image), but cpu has 0.0 GiB free; set "
            "train.bs to at most 4") in line
    assert no_run_folder(tmp_path / "runs")


def test_the_memory_probe_leaves_weights_buffers_and_random_streams_alone():
    from configs import load_config
    from networks import build_model
    from trainer.commands import activation_bytes_per_image
    for name in ("mnist_gauss_1.yaml", "mnist_vqvae.yaml", "celebamask_vmf.yaml"):
        cfg = load_config(name, ["quantization.ema", "True"] if "vqvae" in name else [])
        torch.manual_seed(0)
        model = build_model(cfg).train()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        per_image = activation_bytes_per_image(cfg, model, "cpu")
        assert per_image > 4 * cfg.dataset.dim_x  # at least the input and the output
        assert model.training and torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- smaller items

def test_disk_full_names_the_file(capfd, tmp_path, trained, data, monkeypatch):
    run = copy_run(trained, tmp_path)
    before = metrics_bytes(run)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    line = fails(capfd, "-c", CONFIG, "-ts", run, "path_dataset", data, code=1)
    assert line.startswith(f"error: cannot write {run / 'metrics.jsonl'}: No space left")
    assert metrics_bytes(run) == before  # cut back to where it was
    with pytest.raises(OSError) as error:
        atomic_write_bytes(str(run / "best.pt"), b"x")
    assert error.value.filename == str(run / "best.pt")
    assert not list(run.glob(".best.pt.*.tmp"))


def test_a_raw_pickle_checkpoint_is_one_line_without_a_warning(capfd, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    with open(run / "best.pt", "wb") as f:
        pickle.dump({"model": {}, "epoch": 1}, f, protocol=4)
    line = fails(capfd, "-c", CONFIG, "-ts", run)  # cli() fails on any recorded warning
    assert str(run / "best.pt") in line


@pytest.mark.parametrize("module, argv", [
    ("trainer.release", ["bogus"]),
    ("trainer.release", ["import"]),
    ("trainer.compare", []),
    ("trainer.compare", ["RUN", "--no-such-flag"]),
    ("data.prepare_celebamask_hq", ["--src", "x"]),
    ("data.prepare_celebamask_hq", ["--src", "x", "--dst", "y", "--workers", "many"]),
])
def test_helper_clis_give_one_line_on_bad_arguments(module, argv):
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert f"(see python -m {module}" in line and "--help)" in line


def test_many_samples_are_drawn_in_chunks_with_a_progress_bar(capfd, tmp_path, trained, data,
                                                              monkeypatch):
    from trainer import prior as priors
    from trainer.runs import load_run_model
    run = copy_run(trained, tmp_path)
    assert cli(capfd, "-c", CONFIG, "-ts", run, "--prior", "path_dataset", data,
               *PRIOR_OPTS)[0] == 0
    cfg, model, _ = load_run_model(str(run))

    class Bar:
        def __init__(self, total, desc):
            self.total, self.desc, self.done = total, desc, []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def update(self, n):
            self.done.append(n)

    class Display:
        def progress(self, total, desc):
            self.bar = Bar(total, desc)
            return self.bar

    shown = Display()
    paths = priors.write_samples(str(run), cfg, model, 7, "cpu", seed=3, display=shown)
    assert (shown.bar.total, shown.bar.done) == (7, [7])
    # Up to one chunk, the grids are those one call of the prior draws.
    prior = priors.load_prior(cfg, str(run), "cpu")
    direct = prior.sample(7, *model.latent_shape, temperature=cfg.prior.temperature,
                          generator=torch.Generator().manual_seed(3))
    assert np.array_equal(load_codes(paths[1])["codes"], direct.numpy())
    monkeypatch.setattr(priors, "SAMPLE_CHUNK", 3)
    priors.write_samples(str(run), cfg, model, 7, "cpu", seed=3, display=shown)
    assert (shown.bar.total, shown.bar.desc, shown.bar.done) == (7, "sampling", [3, 3, 1])
    assert load_codes(paths[1])["codes"].shape == (7, *model.latent_shape)


def test_cifar10_batches_pickled_at_protocol_5_are_read(tmp_path):
    from data import DatasetError
    from data.sources.cifar10 import _read_cifar_batch
    written = write_cifar10(str(tmp_path))
    path = written["paths"]["test_batch"]
    with open(path, "rb") as f:
        batch = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=5)
    images, labels = _read_cifar_batch(path)
    assert np.array_equal(images, written["test_images"])
    assert np.array_equal(labels, written["test_labels"])

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "code_ran"),)

    with open(path, "wb") as f:
        pickle.dump({**batch, b"extra": Payload()}, f, protocol=5)
    with pytest.raises(DatasetError, match="holds a pickled posix.mkdir|holds a pickled os.mkdir"):
        _read_cifar_batch(path)
    assert not (tmp_path / "code_ran").exists()
    # Protocol 5's out-of-band buffers are not in the file: refused as unreadable, no crash.
    buffers = []
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=5, buffer_callback=buffers.append)
    with pytest.raises(DatasetError, match="cannot read CIFAR10 batch"):
        _read_cifar_batch(path)

