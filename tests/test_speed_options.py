"""The speed options: bf16 autocast, torch.compile wiring, static shapes, batch splitting."""
import os

import pytest
import torch

import data
from configs import ConfigError, load_config
from networks import build_model
from tests import fixtures
from trainer import Trainer
from util.device import DeviceError, configure_kernels


@pytest.mark.parametrize("name", ["mnist_gauss_1", "celeba_gauss_4", "celebamask_vmf"])
def test_amp_keeps_quantizer_and_losses_in_float32(name):
    cfg = load_config(name)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.amp = True  # the trainer's switch (train.amp), tested below
    x = (torch.randint(0, 19, (2, 1, 64, 64)) if cfg.model.name == "VmfSQVAE"
         else torch.rand(2, *cfg.dataset.shape))
    seen = {}
    quantize = model.quantize

    def spy(z, log_var, mode):
        seen["z"] = z.dtype
        return quantize(z, log_var, mode)

    model.quantize = spy
    x_hat, terms = model(x, "deterministic")
    assert seen["z"] == torch.float32 and x_hat.dtype == torch.float32
    assert all(terms[k].dtype == torch.float32 for k in model.TERMS)
    model.amp = False
    _, exact = model(x, "deterministic")
    # bf16 convolutions change the numbers a little, not the model.
    assert terms["loss"].item() == pytest.approx(exact["loss"].item(), rel=0.05)
    assert terms["loss"].item() != exact["loss"].item()


def test_trainer_chooses_compilation_and_precision(monkeypatch, tmp_path):
    fixtures.write_mnist(str(tmp_path), n_train=48, n_test=8)
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = load_config("mnist_gauss_1.yaml", ["path_dataset", str(tmp_path), "train.compile",
                                             "True"])
    model = build_model(cfg)
    assert not model.amp
    Trainer(cfg, model, data.build_loaders(cfg, "cpu", 0), "cpu")
    assert compiled == [model] and not model.amp
    amp = load_config("mnist_gauss_1.yaml", ["path_dataset", str(tmp_path), "train.amp", "True"])
    Trainer(amp, model, data.build_loaders(amp, "cpu", 0), "cpu")
    assert model.amp


def test_drop_last_gives_static_training_shapes(tmp_path):
    fixtures.write_mnist(str(tmp_path), n_train=60, n_test=8)  # 50 train images
    for drop, sizes in (("False", [16, 16, 16, 2]), ("True", [16, 16, 16])):
        cfg = load_config("mnist_gauss_1.yaml", ["path_dataset", str(tmp_path), "train.bs",
                                                 "16", "train.drop_last", drop])
        loader = data.build_loaders(cfg, "cpu", 0, splits=("train",))["train"]
        loader.set_epoch(1)
        assert [len(x) for x, _ in loader] == sizes


def test_global_batch_is_split_over_processes():
    cfg = load_config("mnist_gauss_1.yaml")
    assert data.per_rank_batch(cfg, 1) == 32 and data.per_rank_batch(cfg, 4) == 8
    per_rank = load_config("mnist_gauss_1.yaml", ["train.bs_per_rank", "24"])
    assert data.per_rank_batch(per_rank, 4) == 24
    with pytest.raises(ConfigError, match="train.bs 32 does not split over 3"):
        data.per_rank_batch(cfg, 3)


@pytest.fixture
def kernel_state(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


@pytest.mark.parametrize("deterministic, fastest, expected", [
    # (--deterministic, --cudnn-benchmark) -> (deterministic algorithms, cudnn.deterministic,
    # cudnn.benchmark, CUBLAS_WORKSPACE_CONFIG set)
    (None, False, (False, True, False, False)),  # the release's cuDNN flags
    (True, False, (True, True, False, True)),
    (None, True, (False, False, True, False)),
])
def test_cuda_kernel_settings(kernel_state, deterministic, fastest, expected):
    # torch.device("cuda") needs no GPU; the settings are made before CUDA starts.
    assert configure_kernels(torch.device("cuda"), deterministic, fastest) == expected[0]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == expected[:3]
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") == expected[3]


def test_cpu_defaults_and_conflicting_kernel_flags(kernel_state):
    assert configure_kernels("cpu") is True
    assert configure_kernels("cpu", cudnn_benchmark=True) is False  # the flag wins
    with pytest.raises(DeviceError, match="exclude each other"):
        configure_kernels("cpu", True, True)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_subnormal_floats_are_flushed_to_zero_on_the_cpu(kernel_state):
    """The EMA codebook's unused statistics shrink by the decay each step into subnormal
    floats, which CPUs compute on in slow microcode (benchmarks/denormals.py)."""
    smallest_normal = torch.finfo(torch.float32).tiny
    try:
        torch.set_flush_denormal(False)
        halved = torch.tensor([smallest_normal]) * 0.5
        assert halved.item() == smallest_normal / 2  # kept as a subnormal number
        configure_kernels("cpu")
        assert (torch.tensor([smallest_normal]) * 0.5).item() == 0.0
        # Normal numbers are untouched, the smallest included.
        assert (torch.tensor([smallest_normal]) * 1.0).item() == smallest_normal
    finally:
        torch.set_flush_denormal(False)
