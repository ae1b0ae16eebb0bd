"""Models: encoders/decoders, quantizer layers, losses, and one builder."""
from .nets import NETWORK_REGISTRY, label_channels
from .quantizers import GaussianQuantizer, VectorQuantizer, VmfQuantizer, arelbo
from .sqvae import GaussianSQVAE, SQVAE, VmfSQVAE
from .vqvae import VQVAE

# model.name -> its class, under the name configs/registry.py allows (load_config checked it).
MODEL_REGISTRY = {cls.__name__: cls for cls in (GaussianSQVAE, VmfSQVAE, VQVAE)}


def build_model(cfg):
    """The model (SQ-VAE or the VQ-VAE baseline) `cfg` describes, freshly initialised on the CPU."""
    if cfg.model.name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model.name {cfg.model.name!r}; "
                         f"allowed: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[cfg.model.name](cfg)


def count_parameters(model):
    """Trainable parameters: total, and the encoder and decoder submodules."""
    def count(module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": count(model), "encoder": count(model.encoder),
            "decoder": count(model.decoder)}


__all__ = ["build_model", "count_parameters", "MODEL_REGISTRY", "NETWORK_REGISTRY",
           "SQVAE", "GaussianSQVAE", "VmfSQVAE", "VQVAE", "label_channels",
           "GaussianQuantizer", "VmfQuantizer", "VectorQuantizer", "arelbo"]
