"""One way every command line ends (util.cli.run_cli), and the companion commands that
main.py --help lists.

main.py's own failures are tested case by case in test_failures.py and
test_run_folder_safety.py; here: the helper's rules, and that each companion command
follows them for Ctrl-C and SIGTERM too.
"""
import errno
import multiprocessing
import os
import re
import signal
import subprocess
import sys

import pytest

import main
from util.cli import EXIT_INPUT, Stopped, UsageError, one_line, run_cli
from util.signals import Terminated, worker_pool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class InputProblem(ValueError):
    pass


class MachineProblem(RuntimeError):
    pass


def raising(error):
    def body():
        raise error
    return body


def ends(capsys, body, **kw):
    """(exit status, stderr) of run_cli(body); nothing may go to stdout."""
    code = run_cli(body, **kw)
    out, err = capsys.readouterr()
    assert out == ""
    return code, err


ERRORS = ((InputProblem, EXIT_INPUT), (MachineProblem, 1))


@pytest.mark.parametrize("error, code, line", [
    (InputProblem("bad value"), 2, "error: bad value"),
    (MachineProblem("loss is nan"), 1, "error: loss is nan"),
    (UsageError("give one of -ts and --resume"), 2, "error: give one of -ts and --resume"),
    (InputProblem("two\n  lines"), 2, "error: two lines"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/best.pt"), 1,
     "error: cannot write /runs/x/best.pt: No space left on device; free space"),
    (OSError(errno.EROFS, "Read-only file system"), 1,
     "error: cannot write: Read-only file system; free space"),
    (KeyboardInterrupt(), 130, "interrupted; nothing was written"),
    (Terminated(), 143, "SIGTERM; nothing was written"),
    (Stopped(143, "SIGTERM; resume with: python main.py --resume RUN"), 143,
     "SIGTERM; resume with: python main.py --resume RUN"),
    (SystemExit(2), 2, None),
    (SystemExit(0), 0, None),
])
def test_each_way_a_command_stops_is_one_line_and_its_status(capsys, error, code, line):
    got, err = ends(capsys, raising(error), errors=ERRORS, os_hint="; free space",
                    interrupted="{what}; nothing was written")
    assert got == code
    assert err == ("" if line is None else line + "\n")


def test_the_statuses_may_come_from_a_function_called_only_when_needed(capsys):
    calls = []

    def statuses():
        calls.append(1)
        return ERRORS
    assert ends(capsys, lambda: 0, errors=statuses) == (0, "")
    assert ends(capsys, raising(KeyboardInterrupt()), errors=statuses)[0] == 130
    assert calls == []  # Ctrl-C during start-up never waits for the imports
    assert ends(capsys, raising(MachineProblem("x")), errors=statuses) == (1, "error: x\n")
    assert calls == [1]


def test_unknown_errors_keep_their_traceback_and_a_broken_import_its_own(capsys):
    with pytest.raises(KeyError):
        run_cli(raising(KeyError("bug")), errors=ERRORS)

    def broken():
        raise ImportError("no module named yacs")
    with pytest.raises(KeyError):  # the first error, not the one of the failed import
        run_cli(raising(KeyError("bug")), errors=broken)


def test_a_stop_is_said_by_torchrun_process_0_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert ends(capsys, raising(Stopped(130, "interrupted; resume with: X"))) == (130, "")
    assert ends(capsys, raising(InputProblem("x")), errors=ERRORS) == (2, "error: x\n")


def test_sigterm_is_an_interruption_while_the_body_runs_and_after_it_as_before(capsys):
    handler = signal.getsignal(signal.SIGTERM)

    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # the handler raises here
    assert ends(capsys, body) == (143, "SIGTERM\n")
    assert signal.getsignal(signal.SIGTERM) is handler


def test_one_line_keeps_a_line_as_it_is():
    assert one_line("a  b") == "a  b"
    assert one_line("a\n  b\r\nc") == "a b c"


def test_a_worker_pool_inside_a_command_closes_at_once_and_quietly():
    # Pool.__exit__ sends SIGTERM to its workers, some still starting: made by
    # util.signals.worker_pool they end as by default, never through Terminated (a traceback
    # from each, or, when the signal comes just before a worker blocks on the task queue, a
    # parent waiting forever).
    code = ("import multiprocessing\n"
            "from util.cli import run_cli\n"
            "from util.signals import worker_pool\n"
            "def double(x):\n"
            "    return 2 * x\n"
            "def body():\n"
            "    for _ in range(50):\n"
            "        with worker_pool(multiprocessing.get_context('fork'), 3) as pool:\n"
            "            total = sum(pool.imap(double, range(10)))\n"
            "    print(total)\n"
            "    return 0\n"
            "raise SystemExit(run_cli(body))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "90\n", "")


def test_sigterm_while_a_pool_starts_reaches_the_command_and_ends_the_pool(capsys):
    fork = multiprocessing.get_context("fork")

    class Context:
        def Pool(self, *args):  # noqa: N802 (multiprocessing's name)
            os.kill(os.getpid(), signal.SIGTERM)  # noted; sent again once the pool is ended
            return fork.Pool(*args)

    def body():
        with worker_pool(Context(), 2) as pool:
            return pool.apply(abs, (-3,))  # not reached
    assert ends(capsys, body) == (143, "SIGTERM\n")
    assert multiprocessing.active_children() == []


# ----------------------------------------------------------------- the companion commands

def companion_commands():
    """(kind, target) of each command listed at the end of main.py --help."""
    epilog = main.build_parser().epilog
    listed = epilog[epilog.index("companion commands"):]
    found = re.findall(r"^  python (?:-m (\S+)|(\S+\.py))", listed, re.M)
    return [("module", m) if m else ("script", s) for m, s in found]


def test_help_ends_with_the_companion_commands():
    assert main.build_parser().format_help().rstrip().endswith(
        "-c CONFIG ... for throughput, epoch time and memory per experiment")
    assert {target for _, target in companion_commands()} >= {
        "trainer.compare", "trainer.release", "data.prepare_celebamask_hq",
        "benchmarks/gpu_check.py", "benchmarks/bench.py"}


@pytest.mark.parametrize("kind, target", companion_commands())
def test_every_companion_command_exists_and_explains_itself(kind, target):
    if kind == "module":
        assert os.path.isfile(os.path.join(REPO, *target.split(".")) + ".py"), target
        argv = ["-m", target, "--help"]
    else:
        assert os.path.isfile(os.path.join(REPO, target)), target
        argv = [target, "--help"]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and proc.stderr == ""


def interrupt_in(monkeypatch, module, name, error):
    def stop(*args, **kwargs):
        raise error
    monkeypatch.setattr(module, name, stop)


@pytest.mark.parametrize("error, code, word", [(KeyboardInterrupt(), 130, "interrupted"),
                                               (Terminated(), 143, "SIGTERM")])
@pytest.mark.parametrize("command", ["compare", "release", "prepare_celebamask_hq"])
def test_companion_commands_stop_on_ctrl_c_and_sigterm_with_one_line(
        capsys, monkeypatch, tmp_path, command, error, code, word):
    if command == "compare":
        from trainer import compare as module
        interrupt_in(monkeypatch, module, "find_runs", error)
        argv = [str(tmp_path)]
    elif command == "release":
        from trainer import release as module
        interrupt_in(monkeypatch, module, "import_run", error)
        (tmp_path / "configs.json").write_text("{}")
        argv = ["import", str(tmp_path)]
    else:
        from data import prepare_celebamask_hq as module
        interrupt_in(monkeypatch, module, "_prepare", error)
        argv = ["--src", str(tmp_path), "--dst", str(tmp_path)]
    assert module.main(argv) == code
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith(f"{word}; "), err
