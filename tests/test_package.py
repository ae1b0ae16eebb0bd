"""`pip install .` installs the quantizer layers alone, as sqvae_layers (pyproject.toml): the
wheel is built from a copy of the clone, offline, and imported with the clone off sys.path."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The clone's own packages: none of them may be installed (they would shadow a user's own).
GENERIC = {"networks", "util", "data", "configs", "trainer", "third_party", "tests",
           "benchmarks", "main.py"}
LAYER_FILES = ("quantizers.py", "functional.py", "reconstruction.py")


def _copy_of_the_clone(dest):
    """The clone as a fresh checkout has it (links kept as links), without run or data
    folders, so that the build writes nothing into the working tree."""
    skip = shutil.ignore_patterns(".git", "checkpoints", "datasets", "build", "*.egg-info",
                                 "__pycache__")

    def ignore(folder, names):
        # tests/data (the MNIST sample, 2 MB) plays no part in a build.
        extra = {"data"} if os.path.basename(folder) == "tests" else set()
        return set(skip(folder, names)) | extra
    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    source = _copy_of_the_clone(root / "clone")
    out = root / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--no-index", "-q", "-w", str(out),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("sqvae_layers-*.whl")
    return path


def test_the_layer_modules_are_the_networks_files():
    # One copy of the layer code: the package's modules are links to networks/.
    for name in LAYER_FILES:
        path = os.path.join(REPO, "sqvae_layers", name)
        assert os.path.islink(path), path
        assert os.path.samefile(path, os.path.join(REPO, "networks", name))


def test_the_wheel_holds_the_layers_and_no_generic_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top = {name.split("/")[0] for name in names}
        assert {t for t in top if not t.endswith(".dist-info")} == {"sqvae_layers"}
        assert not top & GENERIC
        for name in LAYER_FILES:
            # Plain files with the code itself, not the text of a link.
            text = archive.read(f"sqvae_layers/{name}").decode()
            with open(os.path.join(REPO, "networks", name)) as f:
                assert text == f.read()


def test_the_layers_import_and_train_from_the_wheel_alone(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    script = f"""
import importlib.util, sys
sys.path[:] = [{str(site)!r}] + [p for p in sys.path if p and p != {REPO!r}
                                  and not p.startswith({REPO + os.sep!r})]
import torch
import sqvae_layers
from sqvae_layers import GaussianQuantizer, VectorQuantizer, VmfQuantizer, arelbo
assert sqvae_layers.__file__.startswith({str(site)!r}), sqvae_layers.__file__
for name in ("networks", "util", "third_party", "configs", "trainer", "data"):
    assert importlib.util.find_spec(name) is None, name
torch.manual_seed(0)
z = torch.randn(2, 8, 3, 3, requires_grad=True)
for layer, args in ((GaussianQuantizer(8, 16), (z,)),
                    (GaussianQuantizer(8, 16, "gaussian_4"), (z, torch.zeros_like(z))),
                    (VmfQuantizer(8, 16), (z,)), (VectorQuantizer(8, 16), (z,))):
    z_q, aux = layer(*args)
    loss = arelbo(z_q, z.detach()) + aux["loss"]
    loss.backward()
    assert z_q.shape == z.shape and torch.isfinite(loss)
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in ("networks", "util")))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "[]"]
