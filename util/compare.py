"""Compare finished runs: one table row per run folder, as markdown and as CSV.

    python -m util.compare RUN_A RUN_B ... [--csv out.csv]

Each run folder is read through two plain files only: ``config.yaml`` (yaml.safe_load) and
``metrics.jsonl`` (its last record with ``split == "test"``, and the ``train`` records for
the training time). Nothing is unpickled and no other package of this repository is
imported, so the tool works on copied or downloaded run folders.
"""
import argparse
import csv
import json
import math
import os
import sys

import yaml

# (column header, how to format the value in the markdown table)
COLUMNS = (
    ("run", "{}"),
    ("model", "{}"),
    ("dataset", "{}"),
    ("epochs", "{}"),
    ("test mse/pixel", "{:.5f}"),
    ("psnr (dB)", "{:.2f}"),
    ("perplexity (batch)", "{:.1f}"),
    ("perplexity (split)", "{:.1f}"),
    ("codes used", "{}"),
    ("train time (s)", "{:.1f}"),
)


class CompareError(ValueError):
    """A run folder that cannot be compared; the message is one line naming it."""


def _read_config(run_dir):
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise CompareError(f"{run_dir}: no config.yaml (not a run folder of this tool)") from None
    except (OSError, yaml.YAMLError) as e:
        raise CompareError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise CompareError(f"{path}: not a mapping of config keys")
    return cfg


def _read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    records = []
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise CompareError(f"{path}: line {number} is not JSON") from None
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        raise CompareError(f"{run_dir}: no metrics.jsonl (was the run started with "
                           "--save?)") from None
    except OSError as e:
        raise CompareError(f"{path}: unreadable ({e.strerror})") from None
    return records


def _section(cfg, name):
    value = cfg.get(name)
    return value if isinstance(value, dict) else {}


def model_label(cfg):
    """model.name, with the quantizer variant (SQ-VAE) or the EMA codebook (VQ-VAE)."""
    model = _section(cfg, "model")
    name = model.get("name", "?")
    if name == "VQVAE":
        return "VQVAE (EMA)" if _section(cfg, "quantization").get("ema") else "VQVAE"
    return f"{name} ({model.get('param_var_q', '?')})"


def run_label(run_dir):
    # Run folder names repeat across experiments (same network, seed and minute), so the
    # experiment folder above is part of the label.
    parts = os.path.normpath(os.path.abspath(run_dir)).split(os.sep)
    return "/".join(parts[-2:])


def summarize(run_dir):
    """The table row of one run folder, as a dict keyed by column header."""
    if not os.path.isdir(run_dir):
        raise CompareError(f"{run_dir}: no such run folder")
    cfg = _read_config(run_dir)
    records = _read_metrics(run_dir)
    tests = [r for r in records if r.get("split") == "test"]
    if not tests:
        raise CompareError(f"{run_dir}: metrics.jsonl holds no test metrics (training did not "
                           "finish; evaluate it with main.py -ts)")
    test = tests[-1]
    train = [r for r in records if r.get("split") == "train"]
    return {
        "run": run_label(run_dir),
        "model": model_label(cfg),
        "dataset": _section(cfg, "dataset").get("name", "?"),
        # Epochs actually trained (a run may stop before train.epoch_max).
        "epochs": len({r.get("epoch") for r in train}),
        "test mse/pixel": test.get("mse_pixel"),
        "psnr (dB)": test.get("psnr"),
        "perplexity (batch)": test.get("perplexity"),
        "perplexity (split)": test.get("perplexity_split"),
        "codes used": test.get("codes_used"),
        "train time (s)": sum(float(r.get("seconds", 0.0)) for r in train),
    }


def _cell(value, fmt):
    if value is None:
        return "n/a"  # e.g. no mse for label maps, no split-level figures in older runs
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def markdown_table(rows):
    headers = [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[name], fmt) for name, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def write_csv(rows, path):
    # Full precision in the CSV: it is for further processing, the markdown is for reading.
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([name for name, _ in COLUMNS])
        for row in rows:
            writer.writerow(["" if row[name] is None else row[name] for name, _ in COLUMNS])


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m util.compare",
        description="One row per run folder: model, dataset, epochs trained, test MSE per "
                    "pixel, PSNR, per-batch and split-level code perplexity, codes in use, "
                    "and training time (sum of the train records' seconds). Printed as a "
                    "markdown table and written as CSV.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (paths)")
    parser.add_argument("--csv", default="comparison.csv", metavar="PATH",
                        help="where to write the CSV (default: comparison.csv here)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        rows = [summarize(run) for run in args.runs]
        write_csv(rows, args.csv)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.csv}: {e.strerror}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
