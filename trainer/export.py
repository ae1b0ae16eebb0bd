"""Discrete codes of a trained run, and images back from codes.

``python main.py -c CFG -ts RUN --encode SPLIT`` writes ``codes_<SPLIT>.npz`` into the run
folder (format in ``util/codes.py``): the deterministic code index of every latent position
of every image of the split, in dataset order, with the codebook and a hash of the run's
config. These files are the input for training a prior over the discrete codes (a PixelCNN
or a transformer over the H x W grid of indices); codes sampled from such a prior, saved in
the same format, become images through ``decode_codes``.

The hash is taken over the run's own ``config.yaml`` (without command-line overrides such as
``path_dataset``, which do not change the model), so encoding with one data path and decoding
with another still match.
"""
import hashlib
import os

import numpy as np
import torch

from configs import config_to_yaml
from networks import build_model
from util.codes import CodesError, load_codes, pack_codes
from util.io import atomic_write_bytes

from . import runs
from .runs import RunError

SPLITS = ("train", "val", "test")


def codes_file(split):
    return f"codes_{split}.npz"


def config_hash(cfg):
    return hashlib.sha256(config_to_yaml(cfg).encode("utf-8")).hexdigest()


def run_config_hash(run_dir):
    return config_hash(runs.load_run_config(run_dir))


def is_label_model(cfg):
    return cfg.model.name == "VmfSQVAE"


@torch.no_grad()
def encode_split(model, loader):
    """Deterministic code indices of every batch of `loader` (all of them, in loader order),
    as one uint16 array N x H x W on the host."""
    model.eval()
    if model.codebook.shape[0] > np.iinfo(np.uint16).max + 1:
        raise RunError(f"{model.codebook.shape[0]} codes do not fit in uint16 indices")
    chunks = [model.encode(x).to("cpu", torch.int32) for x, _ in loader]
    return torch.cat(chunks).numpy().astype(np.uint16)


def write_codes(run_dir, split, codes, model):
    """codes_<split>.npz in the run folder (atomically); returns its path."""
    path = os.path.join(run_dir, codes_file(split))
    codebook = model.code_vectors().detach().float().cpu().numpy()
    atomic_write_bytes(path, pack_codes(codes, codebook, run_config_hash(run_dir)))
    return path


def load_run_model(run_dir, device="cpu"):
    """The run's config (without overrides) and its best.pt model in eval mode."""
    cfg = runs.load_run_config(run_dir)
    best = os.path.join(run_dir, runs.BEST)
    state = runs.load_checkpoint(best)
    model = build_model(cfg)
    runs.load_model_weights(model, state["model"], best)
    return cfg, model.to(device).eval()


@torch.no_grad()
def decode_indices(model, cfg, codes, device="cpu", batch_size=256):
    """Images for code indices N x H x W (any integer array or tensor): float N x C x H x W
    in [0, 1], or for label maps the argmax class N x 1 x H x W (int64). On the CPU."""
    model.eval()
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    out = []
    for chunk in codes.split(batch_size):
        x_hat = model.decode(chunk.to(device))
        out.append((x_hat.argmax(1, keepdim=True) if is_label_model(cfg) else x_hat).cpu())
    return torch.cat(out)


def decode_codes(run_dir, codes_path, device="cpu", batch_size=256):
    """Decode a codes file with the run's best.pt. Refuses codes made for another config, or
    made before best.pt last changed (the stored codebook no longer matches)."""
    try:
        saved = load_codes(codes_path)
    except CodesError as e:
        raise RunError(str(e)) from None
    expected = run_config_hash(run_dir)
    if saved["config_hash"] != expected:
        raise RunError(f"{codes_path} was written for another config (hash "
                       f"{saved['config_hash'][:12]}…, but {run_dir} has {expected[:12]}…); "
                       "decode it with the run that encoded it")
    cfg, model = load_run_model(run_dir, device)
    codebook = model.code_vectors().detach().float().cpu().numpy()
    if saved["codebook"].shape != codebook.shape or not np.array_equal(saved["codebook"],
                                                                         codebook):
        raise RunError(f"{codes_path} does not match the codebook of {run_dir}/{runs.BEST} "
                       "(the run was trained further after encoding); encode again")
    return decode_indices(model, cfg, saved["codes"], device, batch_size)
