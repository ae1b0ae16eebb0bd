"""benchmarks/bench.py --check, the speed guard: it passes and fails on its limits, and refuses
bad input in one line. (The timings themselves are not asserted: a benchmark, not a test.)

One bad-input case runs a real process (exit status 2 and one line); the others and the timed
cases call the script's main(argv) in this process, as `sys.exit(main())` does, saving a fresh
interpreter's imports (~3 CPU-seconds each)."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from configs import experiment_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench.py")
SMALL = ["-c", "mnist_gauss_1", "--rounds", "1", "network.num_rb", "1"]


def bench(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def bench_in_process(capsys, *args):
    """(status, stdout, stderr) of benchmarks/bench.py's main(args), run in this process on
    one intra-op thread, as the subprocess runs (OMP_NUM_THREADS=1); the kernel settings
    the check changes are restored."""
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    capsys.readouterr()
    try:
        torch.set_num_threads(1)
        status = module.main(list(args))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    out = capsys.readouterr()
    return status, out.out, out.err


def limits_file(tmp_path, value):
    path = tmp_path / "limits.json"
    path.write_text(json.dumps({"mnist_gauss_1": value}))
    return str(path)


def table_row(stdout, name):
    row = next(line for line in stdout.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.parametrize("limit,status,verdict", [(100.0, 0, "ok"), (0.01, 1, "SLOWER")])
def test_check_exits_by_its_limit(tmp_path, capsys, limit, status, verdict):
    raw_file = tmp_path / "raw.json"
    code, stdout, stderr = bench_in_process(capsys, "--check", "--limits",
                                            limits_file(tmp_path, limit), "--json",
                                            str(raw_file), *SMALL)
    assert code == status, stderr
    name, step_ms, floor_ms, ratio, shown_limit, shown_verdict = table_row(stdout,
                                                                          "mnist_gauss_1")
    # The overhead printed is the median of the step/floor ratios of the pairs timed, and the
    # times printed their medians, recomputed here from every timing the command wrote.
    raw = json.loads(raw_file.read_text())["mnist_gauss_1"]
    assert len(raw["step_ms"]) == len(raw["floor_ms"]) == 10  # 1 round of 10 pairs
    pairs = sorted(a / b for a, b in zip(raw["step_ms"], raw["floor_ms"]))
    assert float(ratio) == pytest.approx((pairs[4] + pairs[5]) / 2, abs=5e-4)
    assert float(step_ms) == pytest.approx(sorted(raw["step_ms"])[4:6][0] / 2
                                           + sorted(raw["step_ms"])[4:6][1] / 2, abs=0.05)
    assert float(floor_ms) == pytest.approx(sum(sorted(raw["floor_ms"])[4:6]) / 2, abs=0.05)
    assert float(shown_limit) == limit and shown_verdict == verdict
    if status:
        assert "mnist_gauss_1" in stderr and stderr.count("\n") == 1


def test_bad_input_is_one_line_and_exit_2_from_a_real_process():
    out = bench("--check", "-c", "nope.yaml")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert "config file 'nope.yaml' not found" in out.stderr


@pytest.mark.parametrize("args,needle", [
    (["-c", "nope.yaml"], "config file 'nope.yaml' not found"),
    (["-c", "mnist_gauss_1", "train.lr"], "KEY VALUE pairs"),
    ([], "name the experiment files"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, needle):
    code, out, err = bench_in_process(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert needle in err


def test_a_config_without_a_limit_is_refused(tmp_path, capsys):
    code, _, stderr = bench_in_process(capsys, "--check", "--limits",
                                       limits_file(tmp_path, 1.5), "-c", "mnist_vqvae")
    assert code == 2 and "no overhead limit for mnist_vqvae" in stderr


def test_every_experiment_file_has_a_committed_limit():
    # --check without -c times every file in configs/: each needs its limit.
    with open(os.path.join(ROOT, "benchmarks", "overhead_limits.json")) as f:
        limits = json.load(f)
    names = {re.sub(r"\.yaml$", "", f) for f in experiment_files()}
    assert names <= set(limits)
    assert all(1.0 <= limits[n] <= 3.0 for n in names)  # a ratio of times, not a typo
