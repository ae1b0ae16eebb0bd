"""Compare finished runs, and write the reproduction report from them.

    python -m trainer.compare RUN_OR_FOLDER ... [--csv out.csv] [--report docs/results.md]
                              [--curves out.png] [--notes FILE]

One table row per run folder, printed as markdown; ``--csv`` also writes the rows as CSV,
``--report`` writes a markdown report: the command that made it, mean +- std over seeds of
each (dataset, model, epochs) group, every run's row, and the published figures to compare
with (``published_figures.yaml`` beside this file; the command lines of the GPU rows are in
docs/gpu-runs.md). A folder that is not a run folder stands for the run folders below it
(two levels). ``--curves`` draws the runs' learning curves (util/curves.py).

Each run folder is read through plain files only: its config (``config.yaml`` as plain
YAML data, aliases refused: configs.load_plain_yaml; or for a run folder of the authors'
release its ``configs.json``, read by trainer/release_format.py) and ``metrics.jsonl`` (its
last ``test`` record, its last ``prior_test`` record, and the ``train`` records for the
training time; a release folder has one once ``main.py -ts`` evaluated it). No checkpoint is opened and nothing is unpickled, so the
tool works on copied or downloaded run folders.
"""
import csv
import io
import math
import os
import shlex
import statistics
import sys

import yaml

from configs import YamlAliasError, brief, load_plain_yaml
from util.cli import EXIT_INPUT, OneLineParser, run_command
from util.io import UnsafeLink, atomic_write_bytes

from . import release_format, runs
from .runs import RunError

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLISHED_FIGURES = os.path.join(HERE, "published_figures.yaml")
GPU_RUNS = os.path.join(os.path.dirname(HERE), "docs", "gpu-runs.md")

# (column header, how to format the value in the markdown table)
COLUMNS = (
    ("run", "{}"),
    ("model", "{}"),
    ("dataset", "{}"),
    ("epochs", "{}"),
    ("test mse/image", "{:.2f}"),
    ("test mse/pixel", "{:.5f}"),
    ("psnr (dB)", "{:.2f}"),
    ("perplexity (batch)", "{:.1f}"),
    ("perplexity (split)", "{:.1f}"),
    ("codes used", "{}"),
    ("prior nll (nats/pos)", "{:.3f}"),
    ("unigram (nats/pos)", "{:.3f}"),
    ("prior nll (bits/dim)", "{:.4f}"),
    ("train time (s)", "{:.1f}"),
)
# The figures a report averages over seeds (the others identify the group).
MEASURES = [name for name, _ in COLUMNS if name not in ("run", "model", "dataset", "epochs")]


class CompareError(ValueError):
    """A run folder that cannot be compared; the message is one line naming it."""


def _read_config(run_dir):
    """The config of a run folder as a plain mapping (ours, or the release's configs.json)."""
    path = os.path.join(run_dir, runs.CONFIG_FILE)
    if not os.path.isfile(path):
        if release_format.is_release_run(run_dir):
            return release_format.read_release_json(run_dir)
        raise CompareError(f"{run_dir}: no {runs.CONFIG_FILE} or "
                           f"{release_format.CONFIG_FILE} (not a run folder)")
    try:
        with open(path) as f:
            cfg = load_plain_yaml(f)
    except YamlAliasError:
        raise CompareError(f"{path}: holds a YAML alias (*name), which is refused (aliases "
                           "can expand beyond any memory); not a config of this tool") from None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CompareError(f"{path}: unreadable ({type(e).__name__})") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise CompareError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(cfg, dict):
        raise CompareError(f"{path}: not a mapping of config keys")
    return cfg


def _read_metrics(run_dir):
    if not os.path.isfile(os.path.join(run_dir, runs.METRICS_FILE)):
        raise CompareError(f"{run_dir}: no {runs.METRICS_FILE} (train it with --save, or "
                           "evaluate it with main.py -ts)")
    return runs.read_metrics(run_dir)


def _section(cfg, name):
    value = cfg.get(name)
    return value if isinstance(value, dict) else {}


def _text(value):
    """A config value shown in a table cell: a name as it is (cut to 80 characters), anything
    else as a bounded repr (a config from elsewhere may hold any structure there)."""
    if isinstance(value, str):
        return value if len(value) <= 80 else value[:77] + "..."
    return brief(value)


def model_label(cfg):
    """model.name, with the quantizer variant (SQ-VAE) or the EMA codebook (VQ-VAE)."""
    model = _section(cfg, "model")
    name = _text(model.get("name", "?"))
    if name == "VQVAE":
        return "VQVAE (EMA)" if _section(cfg, "quantization").get("ema") is True else "VQVAE"
    return f"{name} ({_text(model.get('param_var_q', '?'))})"


def _number(record, key, where):
    """record[key] if it is a number or absent (None); else a CompareError naming it."""
    value = record.get(key)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise CompareError(f"{where}: its {key} is {brief(value)}, not a number; fix or remove "
                       "that record")


def run_label(run_dir):
    # Run folder names repeat across experiments (same network, seed and minute), so the
    # experiment folder above is part of the label.
    parts = os.path.normpath(os.path.abspath(run_dir)).split(os.sep)
    return "/".join(parts[-2:])


def _last(records, split):
    found = [r for r in records if r.get("split") == split]
    return found[-1] if found else {}


def summarize(run_dir):
    """The table row of one run folder, as a dict keyed by column header."""
    if not os.path.isdir(run_dir):
        raise CompareError(f"{run_dir}: no such run folder")
    cfg = _read_config(run_dir)
    records = _read_metrics(run_dir)
    test, prior = _last(records, "test"), _last(records, "prior_test")
    if not test:
        raise CompareError(f"{run_dir}: {runs.METRICS_FILE} holds no test metrics (training "
                           "did not finish; evaluate it with main.py -ts)")
    train = [r for r in records if r.get("split") == "train"]
    theirs = release_format.is_release_run(run_dir)
    metrics = os.path.join(run_dir, runs.METRICS_FILE)
    where = {"test": f"{metrics}, its last test record",
             "prior": f"{metrics}, its last prior_test record",
             "train": f"{metrics}, a train record"}
    for record in train:
        _number(record, "seconds", where["train"])
        if not isinstance(record.get("epoch"), (int, type(None))):
            raise CompareError(f"{where['train']}: its epoch is {brief(record['epoch'])}, "
                               "not a whole number; fix or remove that record")
    return {
        "run": run_label(run_dir),
        "model": model_label(cfg) + (", authors' release" if theirs else ""),
        "dataset": _text(_section(cfg, "dataset").get("name", "?")),
        # Epochs actually trained (a run may stop before train.epoch_max); a release run
        # folder records none here.
        "epochs": len({r.get("epoch") for r in train}) or None,
        "test mse/image": _number(test, "mse", where["test"]),
        "test mse/pixel": _number(test, "mse_pixel", where["test"]),
        "psnr (dB)": _number(test, "psnr", where["test"]),
        "perplexity (batch)": _number(test, "perplexity", where["test"]),
        "perplexity (split)": _number(test, "perplexity_split", where["test"]),
        "codes used": _number(test, "codes_used", where["test"]),
        "prior nll (nats/pos)": _number(prior, "nll", where["prior"]),
        "unigram (nats/pos)": _number(prior, "unigram", where["prior"]),
        "prior nll (bits/dim)": _number(prior, "nll_bpd", where["prior"]),
        "train time (s)": (sum(float(r.get("seconds") or 0.0) for r in train)
                           if train else None),
    }


def find_runs(paths):
    """Run folders: each path that is one, else the run folders up to two levels below it."""
    def is_run(folder):
        return (os.path.isfile(os.path.join(folder, runs.CONFIG_FILE))
                or release_format.is_release_run(folder))
    found = []
    for path in paths:
        if not os.path.isdir(path) or is_run(path):
            found.append(path)
            continue
        below = sorted(os.path.join(root, name) for root, dirs, _ in os.walk(path)
                       for name in dirs
                       if os.path.relpath(os.path.join(root, name), path).count(os.sep) <= 1)
        inside = [folder for folder in below if is_run(folder)]
        if not inside:
            raise CompareError(f"{path}: no run folder in it or in its subfolders")
        found.extend(inside)
    return found


def _cell(value, fmt):
    if value is None:
        return "n/a"  # e.g. no mse for label maps, no prior trained, no split-level figures
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def markdown_table(rows, columns=COLUMNS):
    headers = [name for name, _ in columns]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[name], fmt) for name, fmt in columns) + " |")
    return "\n".join(lines)


def write_output(path, data):
    """An output file the user named: a regular file is replaced atomically, a device, FIFO
    or /proc/self/fd link is written in place as a stream (as cp does), never replaced."""
    atomic_write_bytes(path, data, stream_special=True)


def write_csv(rows, path):
    # Full precision in the CSV: it is for further processing, the markdown is for reading.
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([name for name, _ in COLUMNS])
    for row in rows:
        writer.writerow(["" if row[name] is None else row[name] for name, _ in COLUMNS])
    write_output(path, text.getvalue().encode("utf-8"))


def group_rows(rows):
    """One row per (dataset, model, epochs): each measure as (mean, sample std, n) over the
    group's runs that have it."""
    groups = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], row["epochs"]), []).append(row)
    out = []
    for (dataset, model, epochs), members in groups.items():
        summary = {"dataset": dataset, "model": model, "epochs": epochs, "runs": len(members)}
        for name in MEASURES:
            values = [m[name] for m in members if m[name] is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else None
                summary[name] = (statistics.fmean(values), std, len(values))
            else:
                summary[name] = None
        out.append(summary)
    return out


def _mean_std(value, fmt, members):
    if value is None:
        return "n/a"
    mean, std, n = value
    return (fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))
            + ("" if n == members else f" ({n} of {members} runs)"))


def group_table(groups):
    formats = dict(COLUMNS)
    headers = ["dataset", "model", "epochs", "runs", *MEASURES]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for g in groups:
        cells = [g["dataset"], g["model"], _cell(g["epochs"], "{}"), str(g["runs"])]
        cells += [_mean_std(g[name], "{:.1f}" if name == "codes used" else formats[name],
                            g["runs"]) for name in MEASURES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def published_figures(path=PUBLISHED_FIGURES):
    """The rows of the report's published-figures table, from their data file."""
    with open(path) as f:
        rows = load_plain_yaml(f)
    keys = ("dataset", "model", "psnr", "perplexity", "source")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(r) == set(keys)
                                             for r in rows):
        raise CompareError(f"{path}: not a list of entries with {', '.join(keys)}")
    return rows


def published_section(report_path):
    """The report's last section: the published figures, and where the command lines of
    its GPU rows are (linked from the report's own folder)."""
    link = os.path.relpath(GPU_RUNS, os.path.dirname(os.path.abspath(report_path)))
    table = [f"| {r['dataset']} | {r['model']} | {_cell(r['psnr'], '{:.2f}')} | "
             f"{_cell(r['perplexity'], '{:.1f}')} | {r['source']} |"
             for r in published_figures()]
    return "\n".join([
        "## Published figures",
        "",
        "Numbers from the literature to place the tables above. They come from the sources'",
        "own GPU trainings: short rows compare with them in order of magnitude only, rows of",
        "the paper's length more closely.",
        "",
        "| dataset | model | PSNR (dB) | perplexity | source |",
        "|---|---|---|---|---|",
        *table,
        "",
        "The CIFAR10 and CelebA rows of this report need a GPU (an epoch of CelebA is about",
        f"163,000 images): the command lines that make them are in [gpu-runs.md]({link}).",
        ""])


def write_report(path, rows, argv, notes=None):
    """The markdown report at `path` (atomically)."""
    command = "python -m trainer.compare " + shlex.join(argv)
    parts = [
        "# Reproduction report",
        "",
        "Generated from run folders by",
        "",
        f"    {command}",
        "",
        "Do not edit by hand: change the runs and run the command again.",
        "",
    ]
    if notes:
        parts += [notes.rstrip(), ""]
    parts += [
        "## Mean ± sample std over seeds",
        "",
        f"Test split, {runs.BEST} (lowest validation loss). `mse/image` is the squared error "
        "summed over an image's pixels (values in [0, 1]), as the paper reports it; "
        "`perplexity (batch)` is the mean over test batches of exp(entropy of the batch's "
        "code histogram), as the authors' code reports it; `perplexity (split)` and "
        "`codes used` count the whole test split. The prior columns come from "
        "`main.py -ts RUN --prior` (a gated PixelCNN over the code grids): its test NLL "
        "and the entropy of the training codes' histogram, in nats per latent position, "
        "and the NLL in bits per image dimension.",
        "",
        group_table(group_rows(rows)),
        "",
        "## Every run",
        "",
        markdown_table(rows),
        "",
        published_section(path),
    ]
    write_output(path, "\n".join(parts).encode("utf-8"))


def _seed_label(run_dir):
    name = os.path.basename(os.path.normpath(run_dir))  # <network>_seed<N>_<date>_<time>
    seed = [part for part in name.split("_") if part.startswith("seed")]
    return seed[0].replace("seed", "seed ") if seed else name


def curve_runs(paths):
    """(label, records) of every run folder under `paths`, for the learning-curve figure:
    the model, with the dataset and seed where the runs differ in them. Unfinished runs
    count too (their curves so far)."""
    found = []
    for run_dir in find_runs(paths):
        cfg = _read_config(run_dir)
        found.append((model_label(cfg), _text(_section(cfg, "dataset").get("name", "?")),
                      _seed_label(run_dir), _read_metrics(run_dir)))
    datasets = {dataset for _, dataset, _, _ in found}
    labels = [label for label, *_ in found]
    labelled = []
    for label, dataset, seed, records in found:
        text = label + (f", {dataset}" if len(datasets) > 1 else "")
        if labels.count(label) > 1 and len(datasets) == 1:
            text += f", {seed}"
        labelled.append((text, records))
    return labelled


def write_curves(path, paths):
    """The learning-curve figure of the runs under `paths` (util/curves.py) as a PNG."""
    from util.curves import learning_curves_png  # matplotlib only when asked for
    png, _ = learning_curves_png(curve_runs(paths), title="Learning curves, per epoch")
    write_output(path, png)


def read_notes(path):
    """The text of --notes FILE (UTF-8 markdown), or a CompareError for anything else."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CompareError(f"--notes {path}: not UTF-8 text (byte {e.start} is "
                           f"{raw[e.start]:#04x}); give a markdown file") from None


def build_parser():
    parser = OneLineParser(
        prog="python -m trainer.compare",
        description="One row per run folder: model, dataset, epochs trained, test MSE per "
                    "image and per pixel, PSNR, per-batch and split-level code perplexity, "
                    "codes in use, the prior's NLL, and training time. Printed as a "
                    "markdown table; written as CSV or as a report only where told.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders, or folders holding run folders (two levels down)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV to PATH")
    parser.add_argument("--report", metavar="PATH",
                        help="also write the reproduction report (markdown) to PATH")
    parser.add_argument("--curves", metavar="PNG",
                        help="also draw the runs' learning curves per epoch (validation MSE, "
                             "split perplexity, codes in use; SQ-VAE's code entropy, "
                             "sigma_q^2 and temperature) into PNG; unfinished runs count")
    parser.add_argument("--notes", metavar="FILE",
                        help="with --report: a markdown file whose text goes under the "
                             "report's header (how the runs were made)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # A run folder or a file named on the command line that cannot be read is input: 2.
    return run_command(lambda: _main(argv),
                       errors=(((CompareError, RunError, UnsafeLink), EXIT_INPUT),),
                       cannot="read or write", os_status=EXIT_INPUT,
                       interrupted="{what}; each file it writes is whole or as it was")


def _main(argv):
    args = build_parser().parse_args(argv)
    if args.curves:
        write_curves(args.curves, args.runs)
        if not (args.report or args.csv):
            return 0
    rows = [summarize(run) for run in find_runs(args.runs)]
    notes = None
    if args.notes:
        notes = read_notes(args.notes)
    if args.csv:
        write_csv(rows, args.csv)
    if args.report:
        write_report(args.report, rows, argv, notes)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
