"""Every command answers --help before it imports torch (seconds on a cold start): the flags
are parsed first, and the packages a companion command runs from (trainer, data) import
torch only where it is used."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (how to start it, what to run), run as `python -m` or as a script would be.
COMMANDS = [
    ("path", "main.py", []),
    ("module", "trainer.compare", []),
    ("module", "trainer.release", []),
    ("module", "trainer.release", ["import"]),
    ("module", "data.prepare_celebamask_hq", []),
    ("path", "benchmarks/prepare_celebamask_hq.py", []),
    ("path", "benchmarks/gpu_check.py", []),
    ("path", "benchmarks/bench.py", []),
]

PROBE = """
import runpy, sys
how, what, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [what, *args, "--help"]
try:
    if how == "module":
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(what, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = None
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code, file=sys.stderr)
"""


@pytest.mark.parametrize("how, what, args", COMMANDS,
                         ids=[" ".join([c[1], *c[2]]) for c in COMMANDS])
def test_help_is_printed_before_torch_is_imported(how, what, args):
    result = subprocess.run([sys.executable, "-c", PROBE, how, what, *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stderr.strip().splitlines()[-1] in ("NO-TORCH 0", "NO-TORCH None"), \
        result.stderr
    assert "usage:" in result.stdout


def test_limit_batches_says_what_it_limits():
    import main
    (action,) = [a for a in main.build_parser()._actions if a.dest == "limit_batches"]
    text = " ".join(action.help.split())
    assert "train, val and test batches per epoch" in text and "--prior" in text
    assert "--encode, --report and the prior's code grids still take whole splits" in text


def test_release_help_describes_its_command():
    result = subprocess.run([sys.executable, "-m", "trainer.release", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "import copy a release run folder into a new run folder of this tool" in text
    # What needs no import at all, and what does.
    assert "-ts, --report and --encode read one as it is" in text
    assert "--resume and --prior need a run folder of this tool" in text
