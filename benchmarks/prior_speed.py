"""Prior architectures on a run's code grids: CPU seconds per step and epoch, and the
validation NLL reached after the same CPU time (docs/usage.md, "A prior over the codes").

    python main.py -c mnist_gauss_1.yaml -ts RUN --encode train     # codes_train.npz
    python main.py -c mnist_gauss_1.yaml -ts RUN --encode val       # codes_val.npz
    OMP_NUM_THREADS=1 python benchmarks/prior_speed.py RUN --budget 120 \\
        --arch 64,8,5 --arch 32,6,3

Each --arch CHANNELS,LAYERS,KERNEL trains from the same seed with Adam (lr 1e-3, batch
--bs) until it has used --budget seconds of CPU time (time.process_time, so that other jobs
on a shared machine change the wall time, not the figures), and prints the validation NLL
(nats per position) at each quarter of the budget. Run one process per --arch to use
several cores; with OMP_NUM_THREADS=1 the CPU time is that of one idle core.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder holding codes_train.npz and codes_val.npz")
    parser.add_argument("--arch", action="append", required=True, metavar="C,L,K",
                        help="channels, layers and kernel of one prior (repeatable)")
    parser.add_argument("--budget", type=float, default=120,
                        help="CPU seconds of training per architecture (default 120)")
    parser.add_argument("--bs", type=int, default=128, help="batch of code grids (default 128)")
    args = parser.parse_args()

    import torch  # after the flags: --help answers without it

    from networks.prior import GatedPixelCNN, code_nll
    from util.codes import load_codes

    def codes(split):
        loaded = load_codes(os.path.join(args.run, f"codes_{split}.npz"))
        return torch.from_numpy(loaded["codes"].astype("int64")), loaded["codebook"].shape[0]

    (train, size), (val, _) = codes("train"), codes("val")

    @torch.no_grad()
    def val_nll(prior):
        prior.eval()
        total = sum(float(code_nll(prior(val[s:s + 500]), val[s:s + 500], reduction="sum"))
                    for s in range(0, len(val), 500))
        prior.train()
        return total / val.numel()

    for arch in args.arch:
        channels, layers, kernel = map(int, arch.split(","))
        torch.manual_seed(0)
        prior = GatedPixelCNN(size, channels=channels, layers=layers, kernel=kernel)
        optimizer = torch.optim.Adam(prior.parameters(), lr=1e-3)
        cpu, steps, epoch, marks = 0.0, 0, 0, []
        while cpu < args.budget:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
            epoch += 1
            for start in range(0, len(train), args.bs):
                begin = time.process_time()
                loss = prior.nll(train[order[start:start + args.bs]])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                cpu += time.process_time() - begin
                steps += 1
                if cpu >= args.budget * (len(marks) + 1) / 4:
                    marks.append({"cpu_s": round(cpu, 1), "steps": steps,
                                  "val_nll": round(val_nll(prior), 4)})
                if cpu >= args.budget:
                    break
        per_step = cpu / steps
        print(json.dumps({"arch": [channels, layers, kernel], "bs": args.bs,
                          "cpu_s_per_step": round(per_step, 4),
                          "cpu_s_per_epoch": round(per_step * math.ceil(len(train) / args.bs), 1),
                          "marks": marks}), flush=True)


if __name__ == "__main__":
    main()
