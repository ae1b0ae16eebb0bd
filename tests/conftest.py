"""The two tiers of real data, settings every test shares, and fixtures several files use.

Tier 1 runs everywhere, a fresh clone included: the small real MNIST and Fashion-MNIST
subsets shipped in ``tests/data`` (``small_data``), plus the files other tests write in
each dataset's exact format. Tier 2 (``full_data``) runs on the full datasets under the
root named by ``$SQVAE_FULL_DATA``: unset, its tests are skipped with that reason; set
but missing the data, they fail saying what is missing, so a tier that was asked for is
never skipped silently. ``python -m pytest -m full_data`` runs tier 2 alone.
"""
import os
import shutil
import signal

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
SMALL_DATA = os.path.join(TESTS, "data")
FULL_DATA_ENV = "SQVAE_FULL_DATA"
FULL_DATASETS = ("MNIST", "FashionMNIST")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"full_data: needs the full datasets under ${FULL_DATA_ENV} (tier 2)")


def pytest_collection_modifyitems(items):
    # A test is in tier 2 exactly when it asks for the full data: mark it so `-m` selects it.
    for item in items:
        if "full_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.full_data)


@pytest.fixture(scope="session", autouse=True)
def no_download():
    """Tests never reach for the network: a missing dataset must fail fast and clearly.
    (Session-wide, so module fixtures see it too; a test may lift it with monkeypatch.)"""
    previous = os.environ.get("SQVAE_NO_DOWNLOAD")
    os.environ["SQVAE_NO_DOWNLOAD"] = "1"
    yield
    if previous is None:
        del os.environ["SQVAE_NO_DOWNLOAD"]
    else:
        os.environ["SQVAE_NO_DOWNLOAD"] = previous


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in this process and in the programs it starts, as in
    a terminal. A shell starts background jobs (`pytest &`, nohup) with SIGINT ignored, and
    an ignored signal stays ignored across exec, so the Ctrl-C tests would see nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A dataset root holding the shipped MNIST and Fashion-MNIST subsets (a copy, since
    loaders may write beside the files they read)."""
    root = tmp_path_factory.mktemp("datasets")
    for name in FULL_DATASETS:
        shutil.copytree(os.path.join(SMALL_DATA, name), os.path.join(root, name))
    return str(root)


@pytest.fixture(scope="session")
def full_data():
    """The root of the full datasets (tier 2)."""
    root = os.environ.get(FULL_DATA_ENV)
    if not root:
        pytest.skip(f"full-data tier: set {FULL_DATA_ENV} to a dataset root holding "
                    f"{' and '.join(FULL_DATASETS)} to run it")
    missing = [name for name in FULL_DATASETS if not os.path.isdir(os.path.join(root, name))]
    if missing:
        pytest.fail(f"{FULL_DATA_ENV}={root}, but it lacks {', '.join(missing)} (expected "
                    f"{os.path.join(root, missing[0])}); point it at a dataset root or unset "
                    f"it to run tier 1 only", pytrace=False)
    return os.path.abspath(root)


@pytest.fixture(scope="session")
def mnist_runs(tmp_path_factory, small_data):
    """Run folders of SQ-VAE and VQ-VAE, same seed and budget: 2 epochs of 50 training steps
    of 32 images on the shipped MNIST subset, logged every 10 steps (test_logging.py reads
    those records; logging changes no number of the run), evaluation on 100 batches of 10
    (1,000 images per pass). ~15 s on 2 idle cores, once for the session (test_vqvae.py,
    test_compare.py, test_logging.py, test_prior.py, test_image_folder.py). Read-only: a
    test that writes into a run works on a copy."""
    import main
    root = str(tmp_path_factory.mktemp("runs"))
    budget = ["--save", "--seed", "0", "--limit-batches", "50", "train.epoch_max", "2",
              "log.every_steps", "10", "test.bs", "10", "path", root, "path_dataset",
              small_data]
    for name in ("mnist_gauss_1", "mnist_vqvae"):
        assert main.run(["-c", name + ".yaml", *budget]) == 0
    found = []
    for specific in ("mnist_sqvae_gaussian_1", "mnist_vqvae"):
        (run,) = os.listdir(os.path.join(root, specific))
        found.append(os.path.join(root, specific, run))
    return tuple(found)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on two cores shared with other jobs, two threads
    spend most of their time waiting for each other (measured: 2-10 times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stop_prior_in_epoch_2(monkeypatch):
    """Ctrl-C (KeyboardInterrupt) as the prior's training enters its epoch 2, until the
    function returned is called."""
    from trainer.prior import PriorTraining
    original = PriorTraining.train_epoch

    def stop(self, codes):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return original(self, codes)

    monkeypatch.setattr(PriorTraining, "train_epoch", stop)
    return lambda: monkeypatch.setattr(PriorTraining, "train_epoch", original)
