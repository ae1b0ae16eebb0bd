"""Discrete codes of a trained run, and images back from codes.

``python main.py -c CFG -ts RUN --encode SPLIT`` writes ``codes_<SPLIT>.npz`` into the run
folder (format in ``util/codes.py``): the deterministic code index of every latent position
of every image of the split, in dataset order, with the codebook and a hash of the run's
config. These files are the input for training a prior over the discrete codes (a PixelCNN
or a transformer over the H x W grid of indices); codes sampled from such a prior, saved in
the same format, become images through ``decode_codes``.

The hash is taken over the sections of the run's own config that define the model (dataset,
model, network, quantization, flags), so encoding with one data path and decoding with
another, or from another folder, still match.
"""
import hashlib
import os

import numpy as np
import torch

import data
from configs import config_to_yaml
from util.codes import CodesError, load_codes, pack_codes
from util.io import atomic_write_bytes

from . import runs
from .runs import RunError

def codes_file(split):
    return f"codes_{split}.npz"


# The config sections that define a model (the others say where files are and how to train).
MODEL_SECTIONS = ("dataset", "model", "network", "quantization", "flags")
# Keys of those sections that change no number a model computes: what dataset.shape restates,
# and the memory layout. Left out, so the hash of a config is the one it had before they
# existed.
RESTATED = {"dataset": ("channels", "image_size"), "network": ("channels_last",)}


def config_hash(cfg):
    def section(name):
        node = cfg[name].clone()
        for key in RESTATED.get(name, ()):
            node.pop(key, None)
        return node

    model_part = "".join(f"{s}:\n{config_to_yaml(section(s))}" for s in MODEL_SECTIONS)
    return hashlib.sha256(model_part.encode("utf-8")).hexdigest()


def run_config_hash(run_dir):
    return config_hash(runs.read_run_config(run_dir))


def whole_split(cfg, split, device="cpu", recorded=None):
    """A loader over every image of `split` in dataset order, whatever --limit-batches or
    torchrun say: what --encode, --report and the prior read. `recorded`: the files the
    run's splits read (runs.read_dataset_files), where it recorded them."""
    return data.build_loader(cfg, split, batch_size=cfg.test.bs, shuffle=False, device=device,
                             recorded=recorded)


@torch.no_grad()
def encode_split(model, loader):
    """Deterministic code indices of every batch of `loader` (all of them, in loader order),
    as one uint16 array N x H x W on the host."""
    model.eval()
    if model.codebook.shape[0] > np.iinfo(np.uint16).max + 1:
        raise RunError(f"{model.codebook.shape[0]} codes do not fit in uint16 indices")
    chunks = [model.encode(x).to("cpu", torch.int32) for x, _ in loader]
    return torch.cat(chunks).numpy().astype(np.uint16)


def write_codes(run_dir, cfg, split, codes, model, names=None):
    """codes_<split>.npz in the run folder (atomically), with `names` (the file of each row)
    where given; returns its path."""
    path = os.path.join(run_dir, codes_file(split))
    codebook = model.code_vectors().detach().float().cpu().numpy()
    atomic_write_bytes(path, pack_codes(codes, codebook, config_hash(cfg), names=names))
    return path


@torch.no_grad()
def decode_indices(model, codes, device="cpu", batch_size=256):
    """Images for code indices N x H x W (any integer array or tensor): float N x C x H x W
    in [0, 1], or for label maps the argmax class N x 1 x H x W (int64). On the CPU."""
    model.eval()
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    if codes.dim() != 3 or tuple(codes.shape[1:]) != tuple(model.latent_shape):
        raise RunError(f"codes of shape {tuple(codes.shape)} do not fit this model: it "
                       f"decodes N x {model.latent_shape[0]} x {model.latent_shape[1]} grids")
    out = []
    for chunk in codes.split(batch_size):
        x_hat = model.decode(chunk.to(device))
        labels = model.OUTPUTS == "labels"
        out.append((x_hat.argmax(1, keepdim=True) if labels else x_hat).cpu())
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
    _, model, _ = runs.load_run_model(run_dir, device=device)
    codebook = model.code_vectors().detach().float().cpu().numpy()
    if saved["codebook"].shape != codebook.shape or not np.array_equal(saved["codebook"],
                                                                         codebook):
        raise RunError(f"{codes_path} does not match the codebook of {run_dir}/{runs.BEST} "
                       "(the run was trained further after encoding); encode again")
    return decode_indices(model, saved["codes"], device, batch_size)
