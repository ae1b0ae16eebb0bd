"""What several test files build the same way: a model from an experiment file with its input,
and the Gumbel noise the quantizers draw, drawn here independently of networks/."""
import torch

from configs import load_config
from networks import build_model


def make_model(name, *opts, seed=0):
    """(cfg, model) of experiment file `name` with `KEY VALUE` overrides, built after
    torch.manual_seed(seed)."""
    cfg = load_config(name, list(opts))
    torch.manual_seed(seed)
    return cfg, build_model(cfg)


def make_input(cfg, batch, seed=1):
    """A batch the model of `cfg` takes: label maps for VmfSQVAE, images in [0, 1] otherwise."""
    gen = torch.Generator().manual_seed(seed)
    if cfg.model.name == "VmfSQVAE":
        return torch.randint(0, cfg.network.num_class, (batch, *cfg.dataset.shape),
                             generator=gen)
    return torch.rand(batch, *cfg.dataset.shape, generator=gen)


def gumbel_draw(shape, seed, dtype=torch.float32):
    """The Gumbel(0, 1) noise a quantizer draws first after torch.manual_seed(seed), as the
    release draws it: U ~ uniform[0, 1) from the global generator, -log(-log(U + 1e-10) + 1e-10),
    the logarithms taken in `dtype`."""
    torch.manual_seed(seed)
    u = torch.rand(shape).to(dtype)
    return -torch.log(-torch.log(u + 1e-10) + 1e-10)
