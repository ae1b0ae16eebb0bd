"""Codebook use of the VQ-VAE baselines after a fixed number of steps, by codebook start.

    python benchmarks/vq_codebook.py --opts path_dataset DATASET_ROOT [--steps 800]

For MNIST and Fashion-MNIST, the VQ-VAE trained by its codebook loss and the one with the
EMA codebook, each from the uniform(-1/K, 1/K) start of the experiment files and from the
N(0, 1) start of the SQ-VAE: `--steps` training steps (seed 0), then the whole test split
in deterministic mode. Prints a markdown table: codes in use, split perplexity, MSE/pixel.
"""
import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from configs import load_config  # noqa: E402
from networks import build_model  # noqa: E402
from trainer.loop import build_optimizer  # noqa: E402
from trainer.meters import eval_pass  # noqa: E402


def train_steps(cfg, steps, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    loaders = data.build_loaders(cfg, "cpu", seed, splits=("train", "test"))
    optimizer = build_optimizer(cfg, model, "cpu")
    model.train()
    start, done = time.perf_counter(), 0
    for epoch in itertools.count(1):
        loaders["train"].set_epoch(epoch)
        for x, _ in itertools.islice(loaders["train"], steps - done):
            _, terms = model(x, "train")
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            done += 1
        if done == steps:
            break
    seconds = time.perf_counter() - start
    return eval_pass(model, loaders["test"], "deterministic"), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides")
    args = parser.parse_args()
    print(f"| dataset | variant | start | codes used (of K) | perplexity (split) | "
          f"mse/pixel | train s ({args.steps} steps) |")
    print("|---|---|---|---|---|---|---|")
    for name, (variant, ema) in itertools.product(
            ("mnist_vqvae", "fashion-mnist_vqvae"), (("loss", "False"), ("EMA", "True"))):
        for start in ("uniform", "normal"):
            cfg = load_config(name, ["quantization.ema", ema, "quantization.init", start,
                                     *args.opts])
            result, seconds = train_steps(cfg, args.steps)
            print(f"| {cfg.dataset.name} | {variant} | {start} | {result['codes_used']} of "
                  f"{cfg.quantization.size_dict} | {result['perplexity_split']:.1f} | "
                  f"{result['mse_pixel']:.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
