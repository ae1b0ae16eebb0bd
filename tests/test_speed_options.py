"""The speed options: bf16 autocast, torch.compile wiring, static shapes, batch splitting."""
import pytest
import torch

import main
from configs import ConfigError, load_config
from networks import build_model
from tests import fixtures
from trainer import Trainer


@pytest.mark.parametrize("name", ["mnist_gauss_1", "celeba_gauss_4", "celebamask_vmf"])
def test_amp_keeps_quantizer_and_losses_in_float32(name):
    cfg = load_config(name, ["train.amp", "True"])
    torch.manual_seed(0)
    model = build_model(cfg)
    x = (torch.randint(0, 19, (2, 1, 64, 64)) if cfg.model.name == "VmfSQVAE"
         else torch.rand(2, *cfg.dataset.shape))
    seen = {}
    quantize = model.quantize

    def spy(z, log_var, mode, codes=False):
        seen["z"] = z.dtype
        return quantize(z, log_var, mode, codes)

    model.quantize = spy
    x_hat, terms = model(x, "deterministic")
    assert seen["z"] == torch.float32 and x_hat.dtype == torch.float32
    assert all(terms[k].dtype == torch.float32 for k in model.TERMS)
    model.amp = False
    _, exact = model(x, "deterministic")
    # bf16 convolutions change the numbers a little, not the model.
    assert terms["loss"].item() == pytest.approx(exact["loss"].item(), rel=0.05)
    assert terms["loss"].item() != exact["loss"].item()


def test_compile_option_compiles_the_model(monkeypatch, tmp_path):
    fixtures.write_mnist(str(tmp_path), n_train=48, n_test=8)
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = load_config("mnist_gauss_1.yaml", ["path_dataset", str(tmp_path), "train.compile",
                                             "True"])
    model = build_model(cfg)
    Trainer(cfg, model, main.make_loaders(cfg, "cpu", 0), "cpu")
    assert compiled == [model]


def test_drop_last_gives_static_training_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("SQVAE_NO_DOWNLOAD", "1")
    fixtures.write_mnist(str(tmp_path), n_train=60, n_test=8)  # 50 train images
    for drop, sizes in (("False", [16, 16, 16, 2]), ("True", [16, 16, 16])):
        cfg = load_config("mnist_gauss_1.yaml", ["path_dataset", str(tmp_path), "train.bs",
                                                 "16", "train.drop_last", drop])
        loader = main.make_loaders(cfg, "cpu", 0, splits=("train",))["train"]
        loader.set_epoch(1)
        assert [len(x) for x, _ in loader] == sizes


def test_global_batch_is_split_over_processes():
    cfg = load_config("mnist_gauss_1.yaml")
    assert main.per_rank_batch(cfg, 1) == 32 and main.per_rank_batch(cfg, 4) == 8
    per_rank = load_config("mnist_gauss_1.yaml", ["train.bs_per_rank", "24"])
    assert main.per_rank_batch(per_rank, 4) == 24
    with pytest.raises(ConfigError, match="train.bs 32 does not split over 3"):
        main.per_rank_batch(cfg, 3)
