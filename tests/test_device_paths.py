"""Device paths checked without the devices: the float precision and the random-number state
on Apple's MPS, pinned batches for CUDA, and the GPU self-check on a machine without a GPU."""
import importlib.util
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.special as sp
import torch

from data import sources
from data.sources import celebamask_hq, mnist
from data.loader import batch_buffer
from networks import losses
from third_party import bessel
from tests.test_bessel import DtypeRecorder
from third_party.bessel import log_ive, widest_float
from util.device import get_rng_state, set_rng_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(REPO, "benchmarks", "gpu_check.py")


# ---------------------------------------------------------------- precision on MPS

@pytest.mark.parametrize("device, dtype", [
    (torch.device("cpu"), torch.float64), ("cpu", torch.float64),
    (torch.device("cuda", 1), torch.float64), ("meta", torch.float64),
    (torch.device("mps"), torch.float32), ("mps:0", torch.float32)])
def test_widest_float_is_float32_only_on_mps(device, dtype):
    # torch.device objects of any type can be made without the hardware.
    assert widest_float(device) is dtype


@pytest.fixture
def mps_policy(monkeypatch):
    """The vMF loss as it runs on MPS: the policy answers float32; records what it was asked."""
    asked = []

    def policy(device):
        asked.append(torch.device(device))
        return widest_float(torch.device("mps"))
    monkeypatch.setattr(bessel, "widest_float", policy)
    return asked


def test_vmf_normalizer_computes_in_what_the_policy_says(mps_policy):
    k_inv = torch.tensor([0.002, 0.05, 1.3])
    with DtypeRecorder() as recorded:
        got = losses.vmf_log_normalizer(k_inv, 10)
    assert mps_policy == [torch.device("cpu")]  # kappa's own device
    assert torch.float64 not in recorded.dtypes
    by_hand = -9 * torch.log(k_inv) - 1 / k_inv - log_ive(9, 1 / k_inv, dtype=torch.float32)
    assert torch.equal(got, by_hand)
    # And still the vMF normaliser: scipy in float64, within float32 rounding of ~500.
    k = k_inv.double().numpy()
    reference = -9 * np.log(k) - 1 / k - np.log(sp.ive(9, 1 / k))
    np.testing.assert_allclose(got.double().numpy(), reference, rtol=2e-7, atol=0)


def test_vmf_loss_and_gradient_make_no_float64_tensor_on_mps(mps_policy):
    generator = torch.Generator().manual_seed(0)
    x_hat = torch.randn(2, 20, 4, 4, generator=generator, requires_grad=True)
    labels = torch.randint(0, 19, (2, 1, 4, 4), generator=generator)
    log_kappa_inv = torch.tensor(-3.0, requires_grad=True)
    with DtypeRecorder() as recorded:
        loss, _ = losses.vmf_reconstruction(x_hat, labels, log_kappa_inv, 16)
        loss.backward()
    assert torch.float64 not in recorded.dtypes and torch.float32 in recorded.dtypes
    # The CPU's own policy does compute the Bessel function in float64.
    with DtypeRecorder() as recorded:
        widest = widest_float(log_kappa_inv.device)
        log_ive(9, torch.tensor([3.0]), dtype=widest)
    assert widest is torch.float64 and torch.float64 in recorded.dtypes


# ---------------------------------------------------------------- MPS random-number state

@pytest.fixture
def fake_mps(monkeypatch):
    """torch.mps's generator calls, answered by a recorder: MPS present, state `saved`."""
    saved = torch.arange(40, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": saved.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state",
                        lambda new_state, device="mps": restored.append(new_state))
    return saved, restored


def test_mps_generator_state_is_saved_and_restored(fake_mps):
    saved, restored = fake_mps
    state = get_rng_state()
    assert torch.equal(state["mps"], saved)
    # As a checkpoint stores it: loadable with weights_only.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert len(restored) == 1 and torch.equal(restored[0], saved)


def test_without_mps_nothing_is_saved_and_an_mps_state_is_skipped(fake_mps, monkeypatch):
    saved, restored = fake_mps
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    state = get_rng_state()
    assert "mps" not in state
    cpu_state = state["torch"].clone()
    torch.rand(3)
    set_rng_state({**state, "mps": saved})  # an MPS run resumed on another machine
    assert restored == []
    assert torch.equal(torch.get_rng_state(), cpu_state)


# ---------------------------------------------------------------- pinned CelebA batches

def test_batch_buffers_are_pinned_only_for_cuda(monkeypatch):
    pinned = []
    real_empty = torch.empty

    def recording_empty(*shape, pin_memory=False, **kw):
        pinned.append(pin_memory)
        return real_empty(*shape, **kw)  # pinning itself needs a GPU
    monkeypatch.setattr(torch, "empty", recording_empty)
    for device in ("cpu", torch.device("cuda", 0), "cuda", "mps", torch.device("cpu")):
        buffer = batch_buffer((2, 3, 4, 4), device)
        assert buffer.shape == (2, 3, 4, 4) and buffer.dtype == torch.uint8
    assert pinned == [False, True, True, False, False]


def test_cpu_batch_buffer_is_ordinary_memory():
    buffer = batch_buffer((3, 1, 2, 2), torch.device("cpu"))
    assert not buffer.is_pinned() and buffer.shape == (3, 1, 2, 2)
    buffer.numpy()[:] = 7  # the loader fills it through numpy
    assert buffer.sum().item() == 7 * 12


# ---------------------------------------------------------------- benchmarks/gpu_check.py

def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_gpu_check(*args):
    # No GPU visible, whatever the machine has.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, GPU_CHECK, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_succeeds():
    done = run_gpu_check()
    assert done.returncode == 0
    assert done.stdout == "gpu_check: no CUDA GPU is visible to PyTorch here; nothing to check\n"
    assert done.stderr == ""


def test_gpu_check_help_lists_every_setting_and_the_columns():
    done = run_gpu_check("--help")
    assert done.returncode == 0 and done.stderr == ""
    text = " ".join(done.stdout.split())
    assert "setting | ok or failed | img/s | peak MB" in text
    assert "exit 1 if any failed" in text and "prints one line and exits 0" in text
    for name in load_gpu_check().SETTINGS:
        assert f"\n  {name} " in done.stdout, name


def test_gpu_check_adds_the_settings_a_chosen_one_needs():
    gpu_check = load_gpu_check()
    assert gpu_check.selected(["sample"]) == ["default", "prior", "sample"]
    assert gpu_check.selected(["vmf", "evaluate"]) == ["default", "evaluate", "vmf"]
    assert gpu_check.selected(None) == list(gpu_check.SETTINGS)
    with pytest.raises(SystemExit, match="unknown setting gpu"):
        gpu_check.selected(["gpu"])
    # A setting whose prerequisite failed is not started.
    assert gpu_check.run_job("prior", {"runs": {}}, math.inf) == {
        "ok": False, "why": "needs default, which failed"}


def test_gpu_check_copy_times_both_kinds_and_they_compute_the_same(tmp_path, one_thread):
    # The copy job warms both kinds up, then times alternating passes; each kind's batches
    # must reach the model unchanged, so the two sums agree exactly.
    import json
    gpu_check = load_gpu_check()
    result = str(tmp_path / "copy")
    assert gpu_check.copy_child(result, "cpu", batches=3, batch=2, rounds=2) == 0
    with open(result + ".0.json") as f:
        written = json.load(f)
    assert [kind for kind, _ in written["rows"]] == ["pinned", "pageable"]
    assert all(rate > 0 for _, rate in written["rows"])
    assert written["same"] is True


def test_gpu_check_data_is_read_by_the_project_readers(tmp_path):
    gpu_check = load_gpu_check()
    gpu_check.write_datasets(str(tmp_path))
    splits = mnist.load_mnist_like("MNIST", str(tmp_path))
    n_train, n_val = sources.split_sizes("MNIST", gpu_check.MNIST_TRAIN)
    assert [len(splits[s][0]) for s in ("train", "val", "test")] == [
        n_train, n_val, gpu_check.MNIST_TEST]
    assert splits["train"][0].shape[1:] == (1, 28, 28)
    assert gpu_check.mnist_train_images() == n_train
    assert gpu_check.mnist_train_images(3) == 3 * math.ceil(n_train / 3)
    for split, n in gpu_check.LABEL_MAPS.items():
        files = celebamask_hq.celebamask_files(str(tmp_path), split)
        assert len(files) == n
    label_map = celebamask_hq.decode_celebamask_label(files[0])
    assert label_map.shape == (1, 64, 64) and label_map.max() <= 18
    # 8 x 8 blocks of one class each.
    assert (label_map[0] == np.kron(label_map[0, ::8, ::8], np.ones((8, 8)))).all()
