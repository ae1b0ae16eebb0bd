"""Learning curves of several runs side by side, per epoch, from their metrics.jsonl records
(``python -m trainer.compare RUNS --curves PATH``).

The top row compares every run: validation MSE per pixel, split-level perplexity, codes in
use. The bottom row is SQ-VAE's self-annealing: the code entropy per position, the learned
variance sigma_q^2 and the Gumbel-softmax temperature; VQ-VAE runs are left out of it.
"""
import math

from util.figures import finish_axes, new_figure, png_bytes, spans_decades

# (record split, key, panel title, y label, SQ-VAE only)
PANELS = (
    ("val", "mse_pixel", "Validation MSE per pixel", "MSE / pixel", False),
    ("val", "perplexity_split", "Validation perplexity (whole split)", "perplexity", False),
    ("val", "codes_used", "Validation codes in use", "codes", False),
    ("val", "entropy", "Code entropy per position (SQ-VAE, validation)", "nats", True),
    ("train", "param_q", r"Quantizer variance $\sigma^2_q$ (SQ-VAE, epoch mean)",
     r"$\sigma^2_q$", True),
    # VQ-VAE runs of before 2026-12 recorded a constant temperature and a zero entropy:
    # the last column leaves them out.
    ("train", "temperature", "Gumbel-softmax temperature (SQ-VAE, end of epoch)",
     r"$\tau$", True),
)


# The most runs a panel names in its legend; with more it only counts them in its title.
LEGEND_MAX = 12


def epoch_series(records, split, key):
    """(epochs, values) of the finite `key` in the `split` records; the last record of an
    epoch wins, so a re-evaluated epoch is drawn once."""
    by_epoch = {}
    for r in records:
        value = r.get(key)
        if r.get("split") == split and isinstance(r.get("epoch"), int) \
                and isinstance(value, (int, float)) and math.isfinite(value):
            by_epoch[r["epoch"]] = value
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def draw_learning_curves(fig, runs):
    """Draw the panels for `runs`, (label, records) pairs; returns the titles of those drawn
    (a panel no run has data for is left out)."""
    drawn = []
    for split, key, title, ylabel, sqvae_only in PANELS:
        series = []
        for label, records in runs:
            sqvae = any("param_q" in r for r in records if r.get("split") == "train")
            epochs, values = epoch_series(records, split, key)
            if epochs and (sqvae or not sqvae_only):
                series.append((label, epochs, values))
        if series:
            drawn.append((title, ylabel, series))
    columns = 3
    rows = max(1, math.ceil(len(drawn) / columns))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, ylabel, series) in zip(axes, drawn):
        for label, epochs, values in series:
            ax.plot(epochs, values, lw=1.4, label=label, marker="." if len(epochs) < 20
                    else None)
        if spans_decades([v for _, _, values in series for v in values], factor=4.0):
            ax.set_yscale("log")
        few = len(series) <= LEGEND_MAX  # more legend entries would cover the curves
        finish_axes(ax, title if few else f"{title} ({len(series)} runs)", "epoch", ylabel,
                    legend=few)
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    return [title for title, _, _ in drawn]


def learning_curves_png(runs, title=""):
    """PNG bytes of the learning-curve figure of `runs`, and the titles of its panels."""
    fig = new_figure(15, 8)
    titles = draw_learning_curves(fig, runs)
    if title:
        fig.suptitle(title, fontsize=11)
    return png_bytes(fig), titles
