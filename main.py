"""SQ-VAE (Takida et al., ICML 2022) for vision: train, resume and evaluate from the command line.

This file only parses flags and wires the pieces: configs -> data + networks -> trainer.
"""
import argparse
import os
import shlex
import sys

EPILOG = """examples:
  python main.py -c mnist_gauss_1.yaml --save
      train on MNIST (downloaded into ./data on first use), write a run folder
      under ./checkpoints/mnist_sqvae_gaussian_1/
  python main.py -c mnist_gauss_1.yaml --save train.epoch_max 1 path /tmp/runs
      the same with config overrides given as trailing KEY VALUE pairs
  python main.py -c mnist_gauss_1.yaml -ts resnet_seed0_1125_0915
      evaluate a saved run (a folder name under path/path_specific, or a path)

experiment files (in configs/, or give any YAML path):
  {files}

environment: SQVAE_CHECKPOINTS and SQVAE_DATA set the defaults of `path` (run
folders) and `path_dataset` (datasets); overrides on the command line win.
"""


class OneLineParser(argparse.ArgumentParser):
    """Bad flags get one line naming the fix, like every other input error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see python main.py --help)\n")


def build_parser():
    from configs import experiment_files
    parser = OneLineParser(
        prog="main.py",
        description="Train or evaluate one SQ-VAE experiment: yacs defaults "
                    "(configs/defaults.py) merged with an experiment YAML and KEY VALUE "
                    "overrides.",
        epilog=EPILOG.format(files="\n  ".join(experiment_files())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config_file", metavar="CONFIG",
                        help="experiment file: a name from configs/ (e.g. mnist_gauss_1.yaml) "
                             "or a path to a YAML file")
    parser.add_argument("-ts", "--timestamp", metavar="RUN",
                        help="skip training; evaluate the best.pt of run folder RUN (a name "
                             "under path/path_specific, or a path) on the test split and "
                             "append the metrics to its metrics.jsonl")
    parser.add_argument("--report", action="store_true",
                        help="with -ts: also write report.png (training curves, codebook usage "
                             "on the test split, test reconstructions) and its three panels "
                             "report_{curves,codebook,reconstructions}.png into the run folder")
    parser.add_argument("--encode", choices=("train", "val", "test"), metavar="SPLIT",
                        help="with -ts: also write the deterministic code indices of the whole "
                             "SPLIT (train, val or test; --limit-batches does not apply) to "
                             "codes_SPLIT.npz in the run folder, e.g. to train a prior")
    parser.add_argument("--save", action="store_true",
                        help="write a run folder: config.yaml, best.pt, current.pt, "
                             "metrics.jsonl and reconstruction grids")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue the interrupted run folder RUN (a name or a path) "
                             "exactly where its current.pt stopped; implies --save")
    parser.add_argument("--dbg", action="store_true",
                        help="print the reference's per-epoch Train/Validation/Test lines")
    parser.add_argument("--gpu", metavar="IDS",
                        help="CUDA devices to make visible, e.g. 0 or 0,1 "
                             "(sets CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed for initialisation, shuffling and sampling "
                             "(default 0; --resume uses the run's own)")
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
                        help="where to run; auto picks CUDA, then MPS, then the CPU "
                             "(default auto)")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                        help="bitwise-repeatable kernels (default: on for the CPU, off on GPUs)")
    parser.add_argument("--limit-batches", type=int, metavar="N", dest="limit_batches",
                        help="at most N train, val and test batches per epoch (smoke runs)")
    parser.add_argument("--summary", action="store_true",
                        help="print the resolved config and the parameter counts, then exit")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides, e.g. train.epoch_max 1 path /tmp/runs")
    return parser


def per_rank_batch(cfg, world):
    """train.bs is the global batch, split over processes as the reference's DataParallel
    split it; train.bs_per_rank sets the per-process batch instead."""
    from configs import ConfigError
    if cfg.train.bs_per_rank:
        return cfg.train.bs_per_rank
    if cfg.train.bs % world:
        raise ConfigError(f"train.bs {cfg.train.bs} does not split over {world} processes; "
                          "set train.bs to a multiple or use train.bs_per_rank")
    return cfg.train.bs // world


def make_loaders(cfg, device, seed, splits=("train", "val", "test")):
    import data
    from util import distributed as dist
    world = dist.world_size()
    loaders = {}
    for split in splits:
        train = split == "train"
        loaders[split] = data.build_loader(
            cfg, split, batch_size=per_rank_batch(cfg, world) if train else cfg.test.bs,
            shuffle=train, seed=seed, device=device, rank=dist.rank(), world_size=world,
            drop_last=train and cfg.train.drop_last)
    return loaders


def segmentation_for(cfg):
    if cfg.model.name != "VmfSQVAE":
        return None
    from functools import partial

    from networks import label_channels
    from third_party.segmentation import SegmentationMeter
    return partial(SegmentationMeter, cfg.network.num_class, label_channels(cfg.network.num_class))


def summary(cfg):
    from configs import config_to_yaml
    from networks import build_model, count_parameters
    print(config_to_yaml(cfg), end="")
    counts = count_parameters(build_model(cfg))
    print(f"params total={counts['total']} encoder={counts['encoder']} "
          f"decoder={counts['decoder']}")
    return 0


def evaluate_run(args, cfg, device):
    """-ts RUN: the run's best.pt on the test split, with the run's own saved config."""
    import json

    from networks import build_model
    from trainer import Trainer, append_test_records, runs
    from util import distributed as dist
    run_dir = runs.resolve_run_dir(cfg, args.timestamp, "-ts")
    run_cfg = runs.load_run_config(run_dir, args.opts)
    state = runs.load_checkpoint(os.path.join(run_dir, runs.BEST))
    model = build_model(run_cfg)
    runs.load_model_weights(model, state["model"], os.path.join(run_dir, runs.BEST))
    model.to(device)
    loaders = make_loaders(run_cfg, device, args.seed or 0, splits=("val", "test"))
    trainer = Trainer(run_cfg, model, loaders, device, None, limit_batches=args.limit_batches,
                      dbg=True, segmentation=segmentation_for(run_cfg))
    records = trainer.test(state["epoch"], source="-ts")
    if not dist.is_main():
        return 0
    append_test_records(run_dir, records)
    print(json.dumps(records[-1]))
    if args.encode or args.report:
        import data
        from trainer import export, report

        def whole_split(split):
            # Every image once, in dataset order, whatever --limit-batches or torchrun say.
            return data.build_loader(run_cfg, split, batch_size=run_cfg.test.bs, shuffle=False,
                                     device=device)
        test_codes = None
        if args.encode:
            codes = export.encode_split(model, whole_split(args.encode))
            path = export.write_codes(run_dir, args.encode, codes, model)
            print(f"codes of the {args.encode} split {codes.shape}: {path}")
            test_codes = codes if args.encode == "test" else None
        if args.report:
            written = report.write_report(run_dir, run_cfg, model, whole_split("test"), test_codes)
            print(f"report: {written['report']['path']}")
    return 0


def train(args, cfg, device):
    import torch

    from networks import build_model
    from trainer import Trainer, runs
    from util import distributed as dist
    from util.io import check_writable, write_jsonl
    from util.rng import seed_everything

    resume_state, run_dir = None, None
    seed, limit = (0 if args.seed is None else args.seed), args.limit_batches
    if args.resume:
        run_dir = runs.resolve_run_dir(cfg, args.resume, "--resume")
        run_cfg = runs.load_run_config(run_dir, args.opts)
        runs.check_same_experiment(run_cfg, cfg, run_dir, args.config_file)
        cfg = run_cfg
        resume_state = runs.load_checkpoint(os.path.join(run_dir, runs.CURRENT))
        # The seed and epoch length are part of the run: an exact resume needs the same.
        seed, limit = runs.resume_launch(resume_state, args.seed, args.limit_batches)
    elif args.save:
        problem = check_writable(cfg.path_checkpoint)
        if problem:
            raise runs.RunError(f"{problem}; set a writable `path` (override or "
                                "SQVAE_CHECKPOINTS) before training")

    seed_everything(seed)
    model = build_model(cfg).to(device)
    if dist.world_size() > 1:
        # Same initial weights everywhere, but each process draws its own Gumbel noise.
        torch.manual_seed(seed + dist.rank())
    loaders = make_loaders(cfg, device, seed)
    if args.save and run_dir is None:
        run_dir = dist.broadcast_object(
            runs.create_run_dir(cfg, seed) if dist.is_main() else None)
        if dist.is_main():
            print(f"run folder: {run_dir}")
    resume = shlex.join(["python", "main.py", "-c", args.config_file,
                         "--resume", str(run_dir)])
    trainer = Trainer(cfg, model, loaders, device, run_dir, limit_batches=limit,
                      dbg=args.dbg, segmentation=segmentation_for(cfg), resume_command=resume,
                      launch={"seed": seed, "limit_batches": limit})
    if resume_state is not None:
        trainer.load_state_dict(resume_state, os.path.join(run_dir, runs.CURRENT))
        trainer.log(f"resuming {run_dir} at epoch {trainer.epoch}, step {trainer.step}")
    trainer.fit()
    dist.barrier()  # best.pt is written by the main process; the others read it next

    if run_dir is not None:
        best = runs.load_checkpoint(os.path.join(run_dir, runs.BEST))
        runs.load_model_weights(model, best["model"], os.path.join(run_dir, runs.BEST))
        epoch = best["epoch"]
    else:
        epoch = trainer.epoch - 1  # no run folder: test the final weights
    model.to(device)
    records = trainer.test(epoch)
    if run_dir is not None and dist.is_main():
        write_jsonl(os.path.join(run_dir, runs.METRICS_FILE), trainer.history + records)
    return 0


def run(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu

    from configs import ConfigError, load_config
    from data import DatasetError
    from trainer import Interrupted, RunError, TrainingError
    from util import distributed as dist
    from util.device import DeviceError, select_device, set_deterministic

    if not args.config_file:
        print("error: -c/--config_file is required (e.g. -c mnist_gauss_1.yaml); "
              "see python main.py --help", file=sys.stderr)
        return 2
    if args.limit_batches is not None and args.limit_batches < 1:
        print("error: --limit-batches needs a positive number", file=sys.stderr)
        return 2
    if (args.report or args.encode) and not args.timestamp:
        flag = "--report" if args.report else "--encode"
        print(f"error: {flag} works on a saved run: add -ts RUN", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config_file, args.opts)
        if args.summary:
            return summary(cfg)
        device = select_device(args.device, dist.env_world()[1])
        dist.init(device)
        deterministic = args.deterministic if args.deterministic is not None \
            else device.type == "cpu"
        set_deterministic(deterministic, device)
        if args.timestamp:
            return evaluate_run(args, cfg, device)
        if args.resume:
            args.save = True
        return train(args, cfg, device)
    except (ConfigError, DatasetError, RunError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if dist.is_main():
            print(str(e), file=sys.stderr)
        return e.code
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(run())
