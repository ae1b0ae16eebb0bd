"""Test helper: run ``main.run`` with a crash injected, many runs forked from one warm process.

    python tests/_kill_wrapper.py JOBS.json

JOBS.json is a list of jobs, or {"warm_up": ARGV, "jobs": [jobs]}: then main.run(ARGV) runs
first in this process (its output dropped; it must succeed), so that the children start with
what a first run loads and initialises once (lazy imports, kernel set-up): each job then
costs about half. The jobs run two at a time; the jobs of one "root" run one after the
other, in their order. Each job is a dict:

    argv    the command line given to main.run; an item "{run:ROOT}" is replaced by the
            path of the one run folder under ROOT/<path_specific>/ when the job starts,
            "{runname:ROOT}" by that folder's name
    out     stdout and stderr of the job go to OUT.stdout and OUT.stderr
    fault   optional, one of
              {"kill_at_step": N}              SIGKILL right after training step N
              {"signal_at_step": N, "signal": "SIGTERM"}   send a signal to itself there
              {"kill_at_write": K, "log": P}   SIGKILL half-way through the K-th write of
                                               a run-folder file (a call of
                                               util.io.atomic_write_bytes or
                                               util.io.append_jsonl): the file gets half
                                               the bytes, then the process dies; P gets
                                               {"path": the path being written, "cut": true}
    copy_to optional: when the job has ended, copy its run folder (the "{run:ROOT}" of the
            job's "root") to this path, so later jobs can change it and tests still see
            what the job left
    root    the ROOT of copy_to

Each job runs in a child forked from this process (torch is imported once, and used only by
the warm-up run, so the children start warm). Prints the jobs' exit codes as a JSON list, as
subprocess reports them (-9 for SIGKILL).
"""
import builtins
import contextlib
import glob
import io
import json
import os
import shutil
import signal
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main  # noqa: E402
import trainer.export  # noqa: E402,F401  (imports atomic_write_bytes by name)
import trainer.loop  # noqa: E402
import trainer.runs  # noqa: E402,F401  (imports append_jsonl by name)
import util.io  # noqa: E402


def _after_step(n, action):
    original = trainer.loop.Trainer.train_step

    def train_step(self, *args):
        original(self, *args)
        if self.step == n:
            action()

    trainer.loop.Trainer.train_step = train_step


class _CutShort:
    """A writable file whose first write puts half the bytes on disk, then calls `die`."""

    def __init__(self, file, die):
        self._file, self._die = file, die

    def write(self, data):
        self._file.write(data[:len(data) // 2])
        self._file.flush()
        os.fsync(self._file.fileno())
        self._die()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._file, name)


def _kill_at_write(k, log):
    """The k-th write runs for real, but the first file it opens for writing (whatever its
    name) gets half the bytes before SIGKILL; an append puts half its lines' bytes at the
    end of the file, leaving a torn last line."""
    original = util.io.atomic_write_bytes
    original_append = util.io.append_jsonl
    real_open, real_fdopen = builtins.open, os.fdopen
    state = {"count": 0, "armed": False, "path": None}

    def die(cut):
        with real_open(log, "w") as f:
            json.dump({"path": os.path.abspath(state["path"]), "cut": cut}, f)
        os.kill(os.getpid(), signal.SIGKILL)

    def opener(real):
        def open_(*args, **kwargs):
            file = real(*args, **kwargs)
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
            if state["armed"] and any(c in mode for c in "wax+"):
                return _CutShort(file, lambda: die(cut=True))
            return file
        return open_

    def atomic_write_bytes(path, data, **options):
        state["count"] += 1
        if state["count"] != k:
            return original(path, data, **options)
        state["armed"], state["path"] = True, path
        original(path, data, **options)
        die(cut=False)  # only if nothing was written through a Python file object

    def append_jsonl(path, records):
        state["count"] += 1
        if state["count"] != k:
            return original_append(path, records)
        state["path"] = path
        payload = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
        with real_open(path, "ab") as f:
            f.write(payload[:len(payload) // 2])
            f.flush()
            os.fsync(f.fileno())
        die(cut=True)

    builtins.open = opener(real_open)
    os.fdopen = opener(real_fdopen)
    # Modules that imported the functions by name hold their own references.
    for module in list(sys.modules.values()):
        if getattr(module, "atomic_write_bytes", None) is original:
            module.atomic_write_bytes = atomic_write_bytes
        if getattr(module, "append_jsonl", None) is original_append:
            module.append_jsonl = append_jsonl


def install(fault):
    if not fault:
        return
    if "kill_at_step" in fault:
        _after_step(fault["kill_at_step"], lambda: os.kill(os.getpid(), signal.SIGKILL))
    elif "signal_at_step" in fault:
        signum = signal.Signals[fault["signal"]]
        _after_step(fault["signal_at_step"], lambda: os.kill(os.getpid(), signum))
    elif "kill_at_write" in fault:
        _kill_at_write(fault["kill_at_write"], fault["log"])
    else:
        raise ValueError(f"unknown fault {fault!r}")


def resolve(item):
    kind, _, root = item[1:-1].partition(":")
    if not (item.startswith("{") and item.endswith("}") and kind in ("run", "runname")):
        return item
    found = glob.glob(os.path.join(root, "*", "*", ""))
    if len(found) != 1:
        raise RuntimeError(f"expected one run folder for {item}, found {found}")
    path = found[0].rstrip(os.sep)
    return path if kind == "run" else os.path.basename(path)


def child(job):
    for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
        target = os.open(job["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    code = 1
    try:
        install(job.get("fault"))
        code = main.run([resolve(a) for a in job["argv"]])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_jobs(jobs, lanes=2):
    """Run the jobs, at most `lanes` children at a time. Jobs with the same "root" run one
    after the other in their given order (a resume follows its kill); different roots run
    side by side (each child is one thread: two lanes use the two cores of a small
    machine)."""
    chains = {}
    for i, job in enumerate(jobs):
        chains.setdefault(job["root"], []).append(i)
    waiting = list(chains.values())  # each a list of job indices, in order
    codes, running = [None] * len(jobs), {}  # running: pid -> (job index, its chain)

    def start(chain):
        i = chain.pop(0)
        pid = os.fork()
        if pid == 0:
            child(jobs[i])
        running[pid] = (i, chain)

    while waiting or running:
        while waiting and len(running) < lanes:
            start(waiting.pop(0))
        pid, status = os.wait()
        i, chain = running.pop(pid)
        codes[i] = os.waitstatus_to_exitcode(status)
        if jobs[i].get("copy_to"):
            shutil.copytree(resolve("{run:" + jobs[i]["root"] + "}"), jobs[i]["copy_to"])
        if chain:
            waiting.insert(0, chain)  # its next job first: keeps the chains short-lived
    return codes


def warm_up(argv):
    """main.run(argv) in this process, before any fork; its output is shown only if it fails."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main.run(argv)
    if code != 0:
        raise RuntimeError(f"the warm-up run exited {code}:\n{out.getvalue()}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if isinstance(spec, dict):
        warm_up(spec["warm_up"])
        spec = spec["jobs"]
    print(json.dumps(run_jobs(spec)))
