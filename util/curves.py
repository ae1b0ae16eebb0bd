"""Learning curves of several runs per epoch (``python -m trainer.compare RUNS --curves PNG``):
a top row every run has, and a bottom row of SQ-VAE's self-annealing (VQ-VAE runs left out)."""
import math

from util.figures import finish_axes, new_figure, png_bytes, spans_decades

# (record split, key, panel title, y label, SQ-VAE only)
PANELS = (
    ("val", "mse_pixel", "Validation MSE per pixel", "MSE / pixel", False),
    ("val", "perplexity_split", "Validation perplexity (whole split)", "perplexity", False),
    ("val", "codes_used", "Validation codes in use", "codes", False),
    ("val", "entropy", "Code entropy per position (SQ-VAE, validation)", "nats", True),
    ("train", "param_q", r"Quantizer variance $\sigma^2_q$ (SQ-VAE, epoch mean)", r"$\sigma^2_q$",
     True),
    # VQ-VAE runs of before 2026-12 recorded a constant temperature and a zero entropy.
    ("train", "temperature", "Gumbel-softmax temperature (SQ-VAE, end of epoch)",
     r"$\tau$", True),
)

LEGEND_MAX = 12  # the most runs a panel names in its legend; with more its title counts them


def epoch_series(records, split, key):
    """(epochs, values) of the finite `key` in `split` records; an epoch's last record wins."""
    by_epoch = {}
    for r in records:
        value = r.get(key)
        if r.get("split") == split and isinstance(r.get("epoch"), int) \
                and isinstance(value, (int, float)) and math.isfinite(value):
            by_epoch[r["epoch"]] = value
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def draw_learning_curves(fig, runs):
    """Draw the panels some of `runs`, (label, records) pairs, has data for; their titles."""
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
    axes = fig.subplots(max(1, math.ceil(len(drawn) / 3)), 3, squeeze=False).ravel()
    for ax, (title, ylabel, series) in zip(axes, drawn):
        for label, epochs, values in series:
            ax.plot(epochs, values, lw=1.4, label=label, marker="." if len(epochs) < 20 else None)
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
