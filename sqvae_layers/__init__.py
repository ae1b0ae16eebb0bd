"""SQ-VAE's quantizer layers as a package of their own: ``pip install .`` in a clone (or
``pip install git+URL``) installs this package alone, torch its only requirement.

    from sqvae_layers import GaussianQuantizer, VmfQuantizer, VectorQuantizer, arelbo

The modules beside this file are links to the one copy of the layer code, in networks/
(quantizers.py, functional.py, reconstruction.py), which the models of the clone import as
``networks``; a wheel holds them as plain files. docs/layers.md explains the layers.
"""
from .quantizers import (CODEBOOK_INITS, GAUSSIAN_VARIANCES, GaussianQuantizer, VectorQuantizer,
                         VmfQuantizer, arelbo)

__all__ = ["GaussianQuantizer", "VmfQuantizer", "VectorQuantizer", "arelbo",
           "GAUSSIAN_VARIANCES", "CODEBOOK_INITS"]
