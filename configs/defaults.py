"""Every option, its default and a one-line meaning. An experiment YAML overrides some,
trailing ``KEY VALUE`` pairs both; ``configs.load_config`` computes the "derived" keys
(``dataset.shape`` and ``dataset.dim_x`` may be stated, but only as dataset.name's values)."""
import math
import os

from yacs.config import CfgNode as CN

from . import registry

_C = CN()

_C.path = "./checkpoints"  # Root folder of run folders; env SQVAE_CHECKPOINTS overrides it.
_C.path_dataset = "./datasets"  # Datasets' root; env SQVAE_DATA overrides; {repo}/: this repo.
_C.path_specific = "sqvae/"  # Sub-folder of `path`, e.g. <dataset>_sqvae_<variant>/.
_C.nworker = 2  # DataLoader worker processes for datasets read one file per item.
_C.cache_decoded = True  # Decode image files once into a memory-mapped .npy cache.
_C.path_checkpoint = ""  # Derived: the experiment's run root, `path/path_specific`.

_C.dataset = CN()
_C.dataset.name = next(iter(registry.DATASETS))  # One of configs/registry.py DATASETS.
_C.dataset.image_size = 0  # Side of square pictures the config sizes (0: the dataset's own).
_C.dataset.channels = 0  # Channels of such pictures: 3 (RGB) or 1 (grey); 0: the default.
_C.dataset.shape = ()  # Derived: shape (C, H, W) of one input; label maps have C = 1.
_C.dataset.dim_x = 0  # Derived: C*H*W, used by the reconstruction likelihood.

_C.model = CN()
_C.model.name = "GaussianSQVAE"  # GaussianSQVAE (images), VmfSQVAE (label maps) or VQVAE.
_C.model.param_var_q = registry.VARIANTS[0]  # Quantizer variant (the release's key): I-IV, vMF.
_C.model.log_param_q_init = math.log(10.0)  # Initial s: sigma_q^2 = e^v + e^s, kappa_q = e^s + 1.
_C.model.log_kappa_inv = math.log(0.01)  # VmfSQVAE only: initial log of 1/kappa_d.
_C.model.log_var_x_init = math.log(0.1)  # With flags.arelbo False: initial log sigma_x^2.
_C.model.beta = 0.25  # VQVAE only: weight beta of the commitment loss beta * ||z - sg(e)||^2.

_C.network = CN()
_C.network.name = "resnet"  # Encoder/decoder family: resnet (images) or resnet_label (label maps).
_C.network.num_rb = 2  # Number of residual blocks (see docs/model.md §2 for where they sit).
_C.network.num_class = 19  # resnet_label only: label classes (one-hot width 2*ceil(n/2)).
_C.network.act_decoder = "none"  # resnet_label only: exp (Softplus), sigmoid, tanh, none.
_C.network.channels_last = True  # NHWC weights and activations, faster on CPUs (docs/speed.md).

_C.quantization = CN()
_C.quantization.size_dict = 512  # Codebook size K.
_C.quantization.init = "normal"  # Codebook start: normal (N(0, 1)) or uniform (+-1/K, VQ-VAE).
_C.quantization.dim_dict = 64  # Code dimension D as written in the experiment file.
_C.quantization.dim_code = 0  # Derived: the networks' and codebook's D (+ 1 for VmfSQVAE).
_C.quantization.temperature = CN()
_C.quantization.temperature.init = 1.0  # Gumbel-softmax temperature at step 0.
_C.quantization.temperature.decay = 0.00001  # Its exponential decay rate per training step.
_C.quantization.temperature.min = 0.0  # Lower bound of the temperature.
_C.quantization.ema = False  # VQVAE only: codebook by moving averages, not its loss.
_C.quantization.ema_decay = 0.99  # VQVAE with ema only: decay of those moving averages.
_C.quantization.ema_eps = 1e-5  # VQVAE with ema: Laplace smoothing of the code counts.

_C.train = CN()
_C.train.bs = 32  # Training batch size (global, over all devices).
_C.train.lr = 0.001  # Adam learning rate.
_C.train.epoch_max = 100  # Number of training epochs.
_C.train.ckpt_every_steps = 1000  # Also a resumable current.pt every N steps (0: at epoch ends).
_C.train.bs_per_rank = 0  # Per-process batch under torchrun; 0: train.bs split over them.
_C.train.sync_bn = False  # Under torchrun, SyncBatchNorm across processes.
_C.train.amp = False  # bf16 autocast for the conv stacks (quantizer and losses stay float32).
_C.train.compile = False  # torch.compile the model (GPU speed-up; slower first steps).
_C.train.drop_last = False  # Drop the ragged last batch: every step one shape (CUDA graphs).

_C.test = CN()
_C.test.bs = 32  # Batch size of the validation and test loaders (the release's 32).

_C.log = CN()
_C.log.every_steps = 100  # Read the device's metrics and check for a non-finite loss every N steps.

_C.flags = CN()
_C.flags.arelbo = True  # Decoder variance by ARELBO (log of the MSE), not learned.
_C.flags.decay = True  # Anneal the Gumbel-softmax temperature every iteration.
_C.flags.bn = True  # BatchNorm in the conv stacks.

_C.prior = CN()
_C.prior.channels = 32  # Width of the gated PixelCNN prior over code grids (32 fits a CPU).
_C.prior.layers = 0  # Gated layers; 0: the fewest that let each logit see every earlier code.
_C.prior.kernel = 3  # Odd kernel width k >= 3; each layer sees k // 2 positions further.
_C.prior.lr = 0.001  # Adam learning rate of the prior.
_C.prior.bs = 128  # Prior training batch size, in code grids.
_C.prior.epoch_max = 30  # Maximum number of prior training epochs.
_C.prior.patience = 4  # Epochs without a better validation NLL before training stops.
_C.prior.temperature = 1.0  # Sampling: codes drawn from softmax(logits / temperature).


def get_defaults():
    """A fresh, mutable copy of the defaults, with the environment's roots applied."""
    cfg = _C.clone()
    for key, var in (("path", "SQVAE_CHECKPOINTS"), ("path_dataset", "SQVAE_DATA")):
        if os.environ.get(var):
            cfg[key] = os.environ[var]
    return cfg
