"""Training and evaluation steps of a saved run with subnormal floats kept or flushed to zero.

    python benchmarks/denormals.py RUN [--steps 20] [--rounds 3]

Why: the EMA codebook multiplies the statistics of codes nobody picks by 0.99 every step,
so after a few epochs they sink below float32's smallest normal number (1.2e-38). CPUs
compute on such subnormal numbers in slow microcode, and every distance to the codebook
touches them. `util.device.configure_kernels` flushes them to zero on the CPU; this
script measures what that buys on a run's own weights, both settings alternating in one
process (so the machine's other load hits both alike), and how many subnormal values the
run's weights hold.
"""
import argparse
import copy
import os
import sys
import time
from itertools import islice

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from trainer import runs  # noqa: E402
from trainer.loop import build_optimizer  # noqa: E402


def subnormals(tensors):
    tiny = torch.finfo(torch.float32).tiny
    return sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in tensors
               if t.is_floating_point())


def timed_steps(cfg, model, batches, flush):
    """Seconds for a training step on each of `batches`, and for evaluating them."""
    torch.set_flush_denormal(flush)
    model = copy.deepcopy(model)
    optimizer = build_optimizer(cfg, model, "cpu")
    model.train()
    start = time.perf_counter()
    for x in batches:
        _, terms = model(x, "train")
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
    train = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x, "deterministic")
    return train, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("run", help="a run folder (its best.pt is used)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides (path_dataset)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg, model, _ = runs.load_run_model(args.run, args.opts)
    print(f"{args.run}: {subnormals(model.state_dict().values())} subnormal values in "
          "best.pt's weights and buffers")
    loader = data.build_loader(cfg, "train", batch_size=cfg.train.bs, shuffle=False)
    batches = [x for x, _ in islice(loader, args.steps)]
    totals = {False: [0.0, 0.0], True: [0.0, 0.0]}
    for _ in range(args.rounds):
        for flush in (False, True):
            train, evaluation = timed_steps(cfg, model, batches, flush)
            totals[flush][0] += train
            totals[flush][1] += evaluation
    for flush, (train, evaluation) in totals.items():
        print(f"flush subnormals {str(flush):5}: {train / args.rounds:.2f} s for "
              f"{args.steps} training steps, {evaluation / args.rounds:.2f} s for "
              f"{args.steps} evaluation batches")
    print(f"ratio flushed/kept: training {totals[True][0] / totals[False][0]:.3f}, "
          f"evaluation {totals[True][1] / totals[False][1]:.3f}")


if __name__ == "__main__":
    main()
