"""``python -m trainer.compare``: one markdown row per run folder, as CSV (``--csv``), the
reproduction report (``--report``) and the learning curves (``--curves``, util/figures.py).
Only config.yaml (or a release's configs.json) and metrics.jsonl are read, nothing is
unpickled: downloaded run folders are safe to compare. docs/vqvae.md, "Comparing runs"."""
import csv
import io
import math
import os
import shlex
import statistics
import sys

import yaml

from configs import YamlAliasError, brief, load_plain_yaml
from util.cli import EXIT_INPUT, OneLineParser, run_cli
from util.io import UnsafeLink, atomic_write_bytes

from . import release_format, runs
from .runs import RunError

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLISHED_FIGURES = os.path.join(HERE, "published_figures.yaml")
GPU_RUNS = os.path.join(os.path.dirname(HERE), "docs", "gpu-runs.md")

# (column header, its format in the markdown table, (split, key) of the record it comes from)
COLUMNS = (
    ("run", "{}", None), ("model", "{}", None), ("dataset", "{}", None), ("epochs", "{}", None),
    ("test mse/image", "{:.2f}", ("test", "mse")),
    ("test mse/pixel", "{:.5f}", ("test", "mse_pixel")),
    ("psnr (dB)", "{:.2f}", ("test", "psnr")),
    ("perplexity (batch)", "{:.1f}", ("test", "perplexity")),
    ("perplexity (split)", "{:.1f}", ("test", "perplexity_split")),
    ("codes used", "{}", ("test", "codes_used")),
    ("prior nll (nats/pos)", "{:.3f}", ("prior_test", "nll")),
    ("unigram (nats/pos)", "{:.3f}", ("prior_test", "unigram")),
    ("prior nll (bits/dim)", "{:.4f}", ("prior_test", "nll_bpd")),
    ("train time (s)", "{:.1f}", None),
)
FORMATS = {name: fmt for name, fmt, _ in COLUMNS}
MEASURES = list(FORMATS)[4:]  # what a report averages over seeds; the first four name a group


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


def _get(cfg, section, key, default="?"):
    value = cfg.get(section)
    return value.get(key, default) if isinstance(value, dict) else default


def _text(value):
    """A config value in a table cell: a str cut to 80 characters, anything else a brief repr."""
    if isinstance(value, str):
        return value if len(value) <= 80 else value[:77] + "..."
    return brief(value)


def _read_run(run_dir):
    """(model.name with its variant or EMA codebook, dataset, records) of a run folder."""
    cfg = _read_config(run_dir)
    if not os.path.isfile(os.path.join(run_dir, runs.METRICS_FILE)):
        raise CompareError(f"{run_dir}: no {runs.METRICS_FILE} (train it with --save, or "
                           "evaluate it with main.py -ts)")
    name, ema = _text(_get(cfg, "model", "name")), _get(cfg, "quantization", "ema") is True
    label = (("VQVAE (EMA)" if ema else "VQVAE") if name == "VQVAE"
             else f"{name} ({_text(_get(cfg, 'model', 'param_var_q'))})")
    return label, _text(_get(cfg, "dataset", "name")), runs.read_metrics(run_dir)


def _number(record, key, where, types=(int, float), noun="a number"):
    """record[key] if it is a number (of `types`) or absent (None); else a CompareError."""
    value = record.get(key)
    if value is None or (isinstance(value, types) and not isinstance(value, bool)):
        return value
    raise CompareError(f"{where}: its {key} is {brief(value)}, not {noun}; fix or remove "
                       "that record")


def summarize(run_dir):
    """The table row of one run folder, as a dict keyed by column header."""
    if not os.path.isdir(run_dir):
        raise CompareError(f"{run_dir}: no such run folder")
    model, dataset, records = _read_run(run_dir)
    last = {split: next((r for r in reversed(records) if r.get("split") == split), {})
            for split in ("test", "prior_test")}
    if not last["test"]:
        raise CompareError(f"{run_dir}: {runs.METRICS_FILE} holds no test metrics (training "
                           "did not finish; evaluate it with main.py -ts)")
    metrics = os.path.join(run_dir, runs.METRICS_FILE)
    train = [r for r in records if r.get("split") == "train"]
    for record in train:
        _number(record, "seconds", f"{metrics}, a train record")
        _number(record, "epoch", f"{metrics}, a train record", int, "a whole number")
    # Run folder names repeat across experiments: the experiment folder above is named too.
    parts = os.path.normpath(os.path.abspath(run_dir)).split(os.sep)
    theirs = ", authors' release" if release_format.is_release_run(run_dir) else ""
    return {"run": "/".join(parts[-2:]), "model": model + theirs, "dataset": dataset,
            # Epochs actually trained (a run may stop early); a release run folder records none.
            "epochs": len({r.get("epoch") for r in train}) or None,
            "train time (s)": sum(float(r.get("seconds") or 0.0) for r in train) if train else None,
            **{name: _number(last[split], key, f"{metrics}, its last {split} record")
               for name, _, (split, key) in [column for column in COLUMNS if column[2]]}}


def find_runs(paths):
    """Run folders: each path that is one, else the run folders up to two levels below it."""
    def is_run(folder):
        return (os.path.isfile(os.path.join(folder, runs.CONFIG_FILE))
                or release_format.is_release_run(folder))
    found = []
    for path in paths:
        inside = [path] if not os.path.isdir(path) or is_run(path) else sorted(
            folder for root, dirs, _ in os.walk(path)
            for folder in (os.path.join(root, name) for name in dirs)
            if os.path.relpath(folder, path).count(os.sep) <= 1 and is_run(folder))
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


def _markdown(headers, rows):
    """A markdown table of `rows`, lists of cell texts."""
    return "\n".join(["| " + " | ".join(headers) + " |",
                      "|" + "|".join("---" for _ in headers) + "|",
                      *("| " + " | ".join(cells) + " |" for cells in rows)])


def markdown_table(rows):
    return _markdown(FORMATS, [[_cell(row[name], fmt) for name, fmt in FORMATS.items()]
                               for row in rows])


# Outputs are files the user named: a device, FIFO or link to one is streamed into, as cp does.
def write_csv(rows, path):
    # Full precision in the CSV: it is for further processing, the markdown is for reading.
    text = io.StringIO(newline="")
    csv.writer(text).writerows([list(FORMATS), *(["" if row[name] is None else row[name]
                                                  for name in FORMATS] for row in rows)])
    atomic_write_bytes(path, text.getvalue().encode("utf-8"), stream_special=True)


def _mean_std(values, fmt, group_size):
    if not values:
        return "n/a"
    text = fmt.format(statistics.fmean(values))
    if len(values) > 1:
        text += " ± " + fmt.format(statistics.stdev(values))
    return text + ("" if len(values) == group_size else f" ({len(values)} of {group_size} runs)")


def group_table(rows):
    """One row per (dataset, model, epochs): each measure's mean ± sample std where held."""
    groups = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], row["epochs"]), []).append(row)
    return _markdown(["dataset", "model", "epochs", "runs", *MEASURES], [
        [dataset, model, _cell(epochs, "{}"), str(len(members))]
        + [_mean_std([m[name] for m in members if m[name] is not None],
                     "{:.1f}" if name == "codes used" else FORMATS[name], len(members))
           for name in MEASURES]
        for (dataset, model, epochs), members in groups.items()])


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
    """The published figures, and a link (from the report's folder) to the GPU runs' commands."""
    link = os.path.relpath(GPU_RUNS, os.path.dirname(os.path.abspath(report_path)))
    return "\n\n".join([
        "## Published figures",
        "Numbers from the literature to place the tables above. They come from the sources'\n"
        "own GPU trainings: short rows compare with them in order of magnitude only, rows of\n"
        "the paper's length more closely.",
        _markdown(["dataset", "model", "PSNR (dB)", "perplexity", "source"],
                  [[r["dataset"], r["model"], _cell(r["psnr"], "{:.2f}"),
                    _cell(r["perplexity"], "{:.1f}"), r["source"]] for r in published_figures()]),
        "The CIFAR10 and CelebA rows of this report need a GPU (an epoch of CelebA is about\n"
        f"163,000 images): the command lines that make them are in [gpu-runs.md]({link}).\n"])


def write_report(path, rows, argv, notes=None):
    """The markdown report at `path` (atomically)."""
    sections = [
        "# Reproduction report",
        "Generated from run folders by",
        "    python -m trainer.compare " + shlex.join(argv),
        "Do not edit by hand: change the runs and run the command again.",
        *([notes.rstrip()] if notes else []),
        "## Mean ± sample std over seeds",
        f"Test split, {runs.BEST} (lowest validation loss). `mse/image` is the squared error "
        "summed over an image's pixels (values in [0, 1]), as the paper reports it; `perplexity "
        "(batch)` is the mean over test batches of exp(entropy of the batch's code histogram), as "
        "the authors' code reports it; `perplexity (split)` and `codes used` count the whole test "
        "split. The prior columns come from `main.py -ts RUN --prior` (a gated PixelCNN over the "
        "code grids): its test NLL and the entropy of the training codes' histogram, in nats per "
        "latent position, and the NLL in bits per image dimension.",
        group_table(rows),
        "## Every run",
        markdown_table(rows),
        published_section(path),
    ]
    atomic_write_bytes(path, "\n\n".join(sections).encode("utf-8"), stream_special=True)


def curve_runs(paths):
    """(label, records) of every run folder under `paths`, finished or not: the model, and the
    dataset where datasets differ, else the seed where a model repeats."""
    found = []
    for run_dir in find_runs(paths):
        model, dataset, records = _read_run(run_dir)
        name = os.path.basename(os.path.normpath(run_dir))  # <network>_seed<N>_<date>_<time>
        seed = [part for part in name.split("_") if part.startswith("seed")]
        found.append((model, dataset, seed[0].replace("seed", "seed ") if seed else name, records))
    datasets = len({dataset for _, dataset, _, _ in found})
    labels = [label for label, *_ in found]
    return [(label + (f", {dataset}" if datasets > 1 else f", {seed}"
                      if labels.count(label) > 1 else ""), records)
            for label, dataset, seed, records in found]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # A run folder or a file named on the command line that cannot be read is input: 2.
    errors = (((CompareError, RunError, UnsafeLink), EXIT_INPUT),)
    return run_cli(lambda: _main(argv), errors=errors, cannot="read or write", os_status=EXIT_INPUT,
                   interrupted="{what}; each file it writes is whole or as it was")


def _main(argv):
    parser = OneLineParser(
        prog="python -m trainer.compare",
        description="One row per run folder: model, dataset, epochs trained, test MSE per image "
                    "and per pixel, PSNR, per-batch and split-level code perplexity, codes in "
                    "use, the prior's NLL, and training time. Printed as a markdown table; "
                    "written as CSV or as a report only where told.")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders, or folders holding run folders (two levels down)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV to PATH")
    parser.add_argument("--report", metavar="PATH",
                        help="also write the reproduction report (markdown) to PATH")
    parser.add_argument("--curves", metavar="PNG",
                        help="also draw the runs' learning curves per epoch (validation MSE, split "
                             "perplexity, codes in use; SQ-VAE's code entropy, sigma_q^2 and "
                             "temperature) into PNG; unfinished runs count")
    parser.add_argument("--notes", metavar="FILE", help="with --report: a markdown file whose "
                        "text goes under the report's header (how the runs were made)")
    args = parser.parse_args(argv)
    if args.curves:
        from util.figures import learning_curves_png  # matplotlib only when asked for
        png, _ = learning_curves_png(curve_runs(args.runs), title="Learning curves, per epoch")
        atomic_write_bytes(args.curves, png, stream_special=True)
        if not (args.report or args.csv):
            return 0
    rows = [summarize(run) for run in find_runs(args.runs)]
    notes = None
    if args.notes:  # UTF-8 markdown
        with open(args.notes, "rb") as f:
            raw = f.read()
        try:
            notes = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CompareError(f"--notes {args.notes}: not UTF-8 text (byte {e.start} is "
                               f"{raw[e.start]:#04x}); give a markdown file") from None
    if args.csv:
        write_csv(rows, args.csv)
    if args.report:
        write_report(args.report, rows, argv, notes)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
