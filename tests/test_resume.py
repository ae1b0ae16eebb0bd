"""Never lose a run: a killed, interrupted or crashed-while-saving run resumes exactly.

Runs go through ``tests/_kill_wrapper.py``, which forks each command line from one warm
process and injects the crash (SIGKILL after a given step, a signal to itself, or
SIGKILL half-way through the k-th file write). The SIGINT/SIGTERM tests use plain
``python main.py`` processes and signal them from outside.

Every run uses a tiny MNIST in the real file format (tests/fixtures.py) and a small
network, so a step takes milliseconds on the CPU.
"""
import contextlib
import glob
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from configs import load_config
from tests.fixtures import write_mnist

REPO = Path(__file__).resolve().parents[1]
WRAPPER = REPO / "tests" / "_kill_wrapper.py"
# One thread per process: these tests run several processes side by side on a small
# machine, where spinning OpenMP threads would multiply the CPU time several times over.
ENV = {**os.environ, "SQVAE_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"}
CONFIG = "mnist_gauss_1.yaml"
SMALL_NET = ["quantization.dim_dict", "8", "quantization.size_dict", "16", "network.num_rb", "1"]
STEPS = 5      # training batches per epoch (--limit-batches)
DECAY = 0.01   # temperature decay per step, large enough to see in the records
SEED = "1"     # with train.lr 0.1 its validation loss is not monotonic: best != last epoch
IGNORED = {"seconds", "train_seconds", "config"}  # wall-clock times; config names `path`


# ---------------------------------------------------------------- helpers

def train_argv(root, data, *, epochs=3, ckpt=3, seed=SEED, net=SMALL_NET, flags=()):
    return ["-c", CONFIG, "--save", "--seed", seed, "--limit-batches", str(STEPS), *flags,
            *net, "train.bs", "8", "train.lr", "0.1", "test.bs", "500",
            "quantization.temperature.decay", str(DECAY), "train.epoch_max", str(epochs),
            "train.ckpt_every_steps", str(ckpt), "path", str(root), "path_dataset", str(data)]


def resume_argv(root, *, seed=SEED, by_name=False, steps=STEPS):
    """--resume with the run's flags and network overrides ("{run:ROOT}": see the wrapper);
    seed None leaves --seed out."""
    run = f"{{runname:{root}}}" if by_name else f"{{run:{root}}}"
    return ["-c", CONFIG, "--resume", run, *(["--seed", seed] if seed else []),
            "--limit-batches", str(steps), *SMALL_NET, *(["path", str(root)] if by_name else [])]


class Outcome:
    def __init__(self, code, out_prefix, root):
        self.code = code
        self.stdout = Path(f"{out_prefix}.stdout").read_text()
        self.stderr = Path(f"{out_prefix}.stderr").read_text()
        self.root = root

    @property
    def run_dir(self):
        return run_dir(self.root)


def run_dir(root):
    found = glob.glob(os.path.join(root, "*", "*", ""))
    assert len(found) == 1, f"expected one run folder under {root}, found {found}"
    return Path(found[0])


def run_jobs(folder, jobs, warm_up=None):
    """Run (name, root, argv, fault, extra) jobs through the wrapper: two at a time, those of
    one root one after the other; after the command line `warm_up`, if given, in the
    wrapper's own process (see tests/_kill_wrapper.py)."""
    spec = [{"argv": [str(a) for a in argv], "out": str(folder / name), "fault": fault,
             "root": str(root), **extra} for name, root, argv, fault, extra in jobs]
    if warm_up is not None:
        spec = {"warm_up": [str(a) for a in warm_up], "jobs": spec}
    (folder / "jobs.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(WRAPPER), str(folder / "jobs.json")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.splitlines()[-1])
    return {name: Outcome(code, folder / name, root)
            for (name, root, *_), code in zip(jobs, codes)}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where="checkpoint"):
    """Bitwise equality of nested checkpoint data, timing fields aside."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) - IGNORED == set(b) - IGNORED, where
        for key in set(a) - IGNORED:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics(folder):
    lines = (Path(folder) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def assert_same_run(folder, reference):
    """Same best.pt, current.pt and metrics.jsonl (timings aside) as the reference run."""
    for name in ("best.pt", "current.pt"):
        assert_same(load(folder / name), load(reference / name), name)
    assert metrics(folder) == metrics(reference)


def one_error_line(stderr):
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def printed_command(stderr):
    """The `PYTHON /path/to/main.py ...` command an interrupted run printed on stderr, as
    printed: it names the interpreter that ran it, and its paths are absolute, so it runs
    from any folder."""
    line = stderr.strip().splitlines()[-1]
    assert f"resume with: {shlex.quote(sys.executable)} " in line, stderr
    parts = shlex.split(line[line.index("resume with: ") + len("resume with: "):])
    assert parts[:2] == [sys.executable, str(REPO / "main.py")], parts
    return parts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(str(root), n_train=120, n_test=20)  # 100 train, 20 val, 20 test images
    return root


# ---------------------------------------------------------------- the runs

# name: (step killed or signalled at, epoch and step the resume starts from)
KILLS = {
    "mid_epoch": (7, (2, 6)),           # current.pt from step 6, mid-epoch
    "epoch_last_step": (10, (2, 9)),    # the last step of epoch 2; current.pt from step 9
    "after_epoch_end": (11, (3, 10)),   # current.pt written at the end of epoch 2
}
# The first 8 file writes of a run: config.yaml, current.pt + metrics.jsonl (step 3),
# best.pt + 2 grids + current.pt + metrics.jsonl (end of epoch 1).
WRITES = range(1, 9)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Every forked run of this file, in one batch through the wrapper; alongside it, one
    fresh `python main.py` process for the determinism test."""
    folder = tmp_path_factory.mktemp("runs")

    def job(name, root, argv, fault=None, **extra):
        return (name, folder / root, argv, fault, extra)

    def train(root, **kw):
        return train_argv(folder / root, data, **kw)

    def resume(root, **kw):
        return resume_argv(folder / root, **kw)

    jobs = [job("reference", "reference", train("reference"))]
    for name, (step, _) in KILLS.items():
        jobs += [job(name, name, train(name), {"kill_at_step": step}),
                 job(name + "_resumed", name, resume(name))]
    # Killed at step 4, resumed, killed again at step 13, resumed by folder name.
    jobs += [job("twice", "twice", train("twice"), {"kill_at_step": 4}),
             job("twice_resumed", "twice", resume("twice"), {"kill_at_step": 13}),
             job("twice_resumed_again", "twice", resume("twice", by_name=True))]
    for name, step, sig in (("sigterm", 10, "SIGTERM"), ("sigint", 7, "SIGINT")):
        jobs += [job(name, name, train(name), {"signal_at_step": step, "signal": sig}),
                 job(name + "_resumed", name, resume(name))]
    # Interrupted and left for the printed-command tests.
    for name in ("printed_as_is", "printed_with_overrides"):
        jobs.append(job(name, name, train(name), {"signal_at_step": 7, "signal": "SIGTERM"}))
    # A run folder whose path holds a space.
    jobs.append(job("spaced", "with space", train("with space", epochs=1),
                    {"signal_at_step": 2, "signal": "SIGTERM"}))
    # Stopped at batch 4 of epoch 2, resumed with fewer batches per epoch than that.
    jobs += [job("shorter", "shorter", train("shorter"),
                 {"signal_at_step": 9, "signal": "SIGTERM"}),
             job("shorter_resumed", "shorter", resume("shorter", steps=2))]
    # Resumed without --seed, as the --help text of --resume suggests is enough.
    jobs += [job("no_seed", "no_seed", train("no_seed"), {"kill_at_step": 7}),
             job("no_seed_resumed", "no_seed", resume("no_seed", seed=None))]
    # --deterministic given explicitly; another seed.
    jobs += [job("deterministic", "deterministic",
                 train("deterministic", epochs=1, flags=["--deterministic"])),
             job("other_seed", "other_seed", train("other_seed", epochs=1, seed="2"))]
    # SIGKILL half-way through the k-th file write; a copy of what it left; a resume.
    for k in WRITES:
        jobs += [job(f"w{k}", f"w{k}", train(f"w{k}"),
                     {"kill_at_write": k, "log": str(folder / f"w{k}.log")},
                     copy_to=str(folder / f"w{k}_left")),
                 job(f"w{k}_resumed", f"w{k}", resume(f"w{k}"))]

    fresh = subprocess.Popen([sys.executable, "main.py",
                              *train_argv(folder / "fresh", data, epochs=1)],
                             cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    # The wrapper first trains a run of one epoch on data and in a folder of its own, so the
    # forked runs start warm (about half the time each).
    warm_data = folder / "warm_up_data"
    write_mnist(str(warm_data), n_train=120, n_test=20)
    out = run_jobs(folder, jobs, warm_up=train_argv(folder / "warm_up", warm_data, epochs=1))
    _, err = fresh.communicate(timeout=600)
    out["fresh"] = (fresh.returncode, err, folder / "fresh")
    out["writes"] = {k: (folder / f"w{k}_left",
                         json.loads((folder / f"w{k}.log").read_text())) for k in WRITES}
    return out


def test_uninterrupted_reference_run_completes(runs):
    ref = runs["reference"]
    assert ref.code == 0, ref.stderr
    records = metrics(ref.run_dir)
    assert [r["split"] for r in records][-2:] == ["test_stochastic", "test"]
    assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15]


@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_then_resume_gives_bitwise_the_same_run(runs, name):
    kill, resumed = runs[name], runs[name + "_resumed"]
    assert kill.code == -signal.SIGKILL
    assert resumed.code == 0, resumed.stderr
    epoch, step = KILLS[name][1]
    assert f"at epoch {epoch}, step {step}" in resumed.stdout  # it did restart mid-run
    assert_same_run(resumed.run_dir, runs["reference"].run_dir)


def test_killed_twice_and_resumed_by_folder_name_is_still_exact(runs):
    assert runs["twice"].code == -signal.SIGKILL
    assert runs["twice_resumed"].code == -signal.SIGKILL
    assert "at epoch 1, step 3" in runs["twice_resumed"].stdout
    final = runs["twice_resumed_again"]
    assert final.code == 0, final.stderr
    assert "at epoch 3, step 12" in final.stdout
    assert_same_run(final.run_dir, runs["reference"].run_dir)


def test_history_best_and_temperature_continue_across_a_resume(runs):
    folder = runs["mid_epoch_resumed"].run_dir
    records = metrics(folder)
    reference = metrics(runs["reference"].run_dir)
    assert records == reference  # every line of the uninterrupted run, nothing more
    train = [r for r in records if r["split"] == "train"]
    assert [r["epoch"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["step"] == r["epoch"] * STEPS
        assert r["temperature"] == pytest.approx(math.exp(-DECAY * r["step"]), rel=1e-12)
    assert train[-1]["temperature"] == pytest.approx(math.exp(-DECAY * 3 * STEPS), rel=1e-12)
    # best.pt holds the epoch with the lowest validation loss over the whole history,
    # including the epochs before the kill.
    val = {r["epoch"]: r["loss"] for r in records if r["split"] == "val"}
    best_epoch = max(e for e, loss in val.items() if loss == min(val.values()))
    best, current = load(folder / "best.pt"), load(folder / "current.pt")
    assert best["epoch"] == current["best_epoch"] == best_epoch
    assert best["val_loss"] == current["best_loss"] == val[best_epoch]


@pytest.mark.parametrize("name, code, epoch, step", [("sigterm", 143, 2, 10),
                                                     ("sigint", 130, 2, 7)])
def test_signal_at_a_step_then_resume_gives_bitwise_the_same_run(runs, name, code, epoch,
                                                                 step):
    """SIGTERM at the last step of an epoch, SIGINT mid-epoch."""
    stop, resumed = runs[name], runs[name + "_resumed"]
    assert stop.code == code
    line = stop.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"step {step}, epoch {epoch}" in line
    assert f"--resume {str(stop.run_dir).rstrip('/')}" in line
    assert resumed.code == 0, resumed.stderr
    assert f"at epoch {epoch}, step {step}" in resumed.stdout  # from where it stopped
    assert_same_run(resumed.run_dir, runs["reference"].run_dir)


def test_deterministic_runs_with_one_seed_are_bitwise_equal(runs):
    # --deterministic given explicitly (a forked run) and the CPU default (a fresh process)
    code, stderr, root = runs["fresh"]
    assert code == 0, stderr
    a = load(runs["deterministic"].run_dir / "best.pt")["model"]
    assert_same(a, load(run_dir(root) / "best.pt")["model"], "best.pt model")
    other = load(runs["other_seed"].run_dir / "best.pt")["model"]
    assert a.keys() == other.keys()
    assert not torch.equal(a["quantizer.codebook"], other["quantizer.codebook"])
    assert sum(not torch.equal(a[k], other[k]) for k in a) > len(a) // 2


def test_deterministic_is_the_default_on_the_cpu(tmp_path):
    import main
    before = torch.are_deterministic_algorithms_enabled()
    try:
        missing = str(tmp_path / "missing")  # stops with exit 2 right after the device setup
        assert main.run(["-c", CONFIG, "--device", "cpu", "-ts", missing]) == 2
        assert torch.are_deterministic_algorithms_enabled()
        assert main.run(["-c", CONFIG, "--device", "cpu", "--no-deterministic",
                         "-ts", missing]) == 2
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_resume_without_seed_flag_uses_the_runs_own_seed(runs):
    assert runs["no_seed"].code == -signal.SIGKILL
    resumed = runs["no_seed_resumed"]
    assert resumed.code == 0, resumed.stderr
    assert_same_run(resumed.run_dir, runs["reference"].run_dir)


# ---------------------------------------------------------------- the printed resume command

@pytest.fixture(scope="module")
def printed(runs, tmp_path_factory):
    """The commands printed by two runs stopped by SIGTERM at step 7, run side by side from
    another folder: as printed, and with the run's network overrides added (both with
    epoch_max 2)."""
    extra = {"printed_as_is": [], "printed_with_overrides": SMALL_NET}
    procs = {}
    for name, more in extra.items():
        assert runs[name].code == 143, runs[name].stderr
        procs[name] = subprocess.Popen(
            printed_command(runs[name].stderr) + more + ["train.epoch_max", "2"],
            cwd=tmp_path_factory.mktemp("elsewhere"), env=ENV, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    return {name: (proc.wait(timeout=300), proc.stderr.read(), runs[name].run_dir)
            for name, proc in procs.items()}


def test_printed_command_resumes_a_run_with_overridden_network(printed):
    code, stderr, folder = printed["printed_as_is"]
    assert code == 0, stderr
    # It continued the stopped run (its small network, its epoch length) to the end.
    assert [r["step"] for r in metrics(folder) if r["split"] == "train"] == [STEPS, 2 * STEPS]
    assert load(Path(folder) / "current.pt")["epoch"] == 3


def test_printed_command_keeps_the_runs_epoch_length(printed):
    code, stderr, folder = printed["printed_with_overrides"]
    assert code == 0, stderr
    steps = [r["step"] for r in metrics(folder) if r["split"] == "train"]
    assert steps == [STEPS, 2 * STEPS]


ASYNC_STEPS = 4  # 30 training images in batches of 8


def test_printed_command_quotes_the_run_folder(runs):
    stop = runs["spaced"]
    assert stop.code == 143 and " " in str(stop.run_dir)
    command = printed_command(stop.stderr)
    assert command[command.index("--resume") + 1] == str(stop.run_dir).rstrip("/")


def test_resume_with_fewer_batches_than_already_done_is_no_traceback(runs):
    assert runs["shorter"].code == 143
    resumed = runs["shorter_resumed"]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-2000:]
    assert resumed.code in (0, 2)
    if resumed.code == 2:
        assert "--limit-batches" in one_error_line(resumed.stderr)


def async_argv(root, data):
    """Long enough to be still training when the signal comes. No overrides of the
    network and no --limit-batches: the printed command does not carry them."""
    return ["-c", CONFIG, "--save", "train.bs", "8", "test.bs", "500",
            "train.epoch_max", "50", "train.ckpt_every_steps", "2",
            "path", str(root), "path_dataset", str(data)]


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    """A SIGINT and a SIGTERM run, signalled from outside once current.pt exists, then
    resumed with the command each printed (both pairs run side by side)."""
    folder = tmp_path_factory.mktemp("signals")
    data = folder / "data"
    write_mnist(str(data), n_train=36, n_test=6)
    sigs = (signal.SIGINT, signal.SIGTERM)
    procs = {s: subprocess.Popen([sys.executable, "main.py",
                                  *async_argv(folder / s.name, data)],
                                 cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in sigs}
    waiting, deadline = set(sigs), time.monotonic() + 300
    while waiting and time.monotonic() < deadline:
        for s in list(waiting):
            if glob.glob(str(folder / s.name / "*" / "*" / "current.pt")):
                procs[s].send_signal(s)
                waiting.discard(s)
            elif procs[s].poll() is not None:
                waiting.discard(s)
        time.sleep(0.02)
    for s in waiting:
        procs[s].kill()
    result = {}
    for s in sigs:
        out, err = procs[s].communicate(timeout=300)
        state = load(run_dir(folder / s.name) / "current.pt")
        result[s] = {"code": procs[s].returncode, "stdout": out, "stderr": err,
                     "run_dir": run_dir(folder / s.name), "epoch": state["epoch"],
                     "step": state["step"]}
    # The printed commands run here, through main.run with the printed arguments (after
    # `PYTHON .../main.py`, which printed_command checks): the processes of the `printed`
    # fixture run such commands as printed; this saves two interpreters' imports.
    import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the processes
    try:
        for s in sigs:
            if "resume with: " in result[s]["stderr"]:
                command = printed_command(result[s]["stderr"])
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = main.run(command[2:] + ["train.epoch_max", str(result[s]["epoch"])])
                result[s].update(command=command, resume_code=code,
                                 resume_stdout=out.getvalue(), resume_stderr=err.getvalue())
    finally:
        torch.set_num_threads(threads)
    return result


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_from_outside_stops_with_a_working_resume_command(signalled, sig, code):
    r = signalled[sig]
    assert r["code"] == code, r["stderr"]
    lines = r["stderr"].strip().splitlines()
    assert "Traceback" not in r["stderr"] and len(lines) == 1, r["stderr"]
    assert sig.name in lines[0] and f"step {r['step']}, epoch {r['epoch']}" in lines[0]
    command = r["command"]
    assert command[command.index("--resume") + 1] == str(r["run_dir"]).rstrip("/")
    assert r["step"] >= 2  # stopped mid-training, after at least one checkpoint
    # The printed command (with a smaller epoch_max) continues and finishes the run.
    assert r["resume_code"] == 0, r["resume_stderr"]
    assert f"at epoch {r['epoch']}, step {r['step']}" in r["resume_stdout"]
    records = metrics(r["run_dir"])
    train = [x for x in records if x["split"] == "train"]
    assert [x["epoch"] for x in train] == list(range(1, r["epoch"] + 1))
    assert [x["step"] for x in train] == [ASYNC_STEPS * e for e in range(1, r["epoch"] + 1)]
    assert [x["split"] for x in records][-2:] == ["test_stochastic", "test"]
    assert 1 <= load(r["run_dir"] / "best.pt")["epoch"] <= r["epoch"]


# ---------------------------------------------------------------- SIGKILL while saving

@pytest.mark.parametrize("k", WRITES)
def test_kill_while_writing_leaves_only_whole_files(runs, k):
    assert runs[f"w{k}"].code == -signal.SIGKILL
    left, write = runs["writes"][k]
    # The write that was cut short (half its bytes on disk) was one of the run folder's
    # files; under its final name it must be absent or an older whole version, like
    # every other file.
    assert write["cut"]
    assert Path(write["path"]).parent.resolve() == runs[f"w{k}"].run_dir.resolve()
    for name in ("best.pt", "current.pt"):
        if (left / name).exists():
            state = load(left / name)
            assert state["model"] and all(torch.isfinite(t).all()
                                          for t in state["model"].values())
    if (left / "metrics.jsonl").exists():
        # Whole lines, but for a torn last one where an append was cut short.
        text = (left / "metrics.jsonl").read_text()
        whole, _, torn = text.rpartition("\n")
        assert bool(torn) == (write["path"].endswith("metrics.jsonl"))
        records = [json.loads(line) for line in whole.splitlines()]
        if (left / "current.pt").exists():  # appended after current.pt: it may lag behind
            assert records == load(left / "current.pt")["history"][:len(records)]
    if (left / "config.yaml").exists():
        assert load_config(str(left / "config.yaml")).quantization.size_dict == 16
    for png in left.glob("reconstructions_*.png"):
        content = png.read_bytes()
        assert content.startswith(b"\x89PNG") and content.endswith(b"IEND\xaeB`\x82")


def test_kills_while_writing_hit_every_kind_of_file(runs):
    names = {Path(write["path"]).name for _, write in runs["writes"].values()}
    assert {"config.yaml", "current.pt", "best.pt", "metrics.jsonl",
            "reconstructions_best.png", "reconstructions_current.png"} <= names


@pytest.mark.parametrize("k", WRITES)
def test_resume_after_kill_while_writing(runs, k):
    left, _ = runs["writes"][k]
    r = runs[f"w{k}_resumed"]
    if (left / "current.pt").exists():
        assert r.code == 0, r.stderr
        assert_same_run(r.run_dir, runs["reference"].run_dir)
    else:
        # Nothing to resume from yet: one clear line, not a traceback.
        assert r.code == 2
        line = one_error_line(r.stderr)
        assert "current.pt" in line or "config.yaml" in line
