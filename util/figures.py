"""Figures from plain data (records, code usage, images): a run report, several runs' learning
curves (``compare --curves``). Each ``draw_*`` draws into a Figure or SubFigure (a panel, or part
of ``report.png``), returning its titles. Agg, not pyplot: no display, no global figures."""
import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TRAIN_COLOR, VAL_COLOR, GUIDE_COLOR = "tab:blue", "tab:orange", "0.45"
DPI = 100
CURVES_SIZE, CODEBOOK_SIZE, RECON_SIZE = (15, 8), (7, 4.8), (8, 4.4)  # inches, of each panel


def new_figure(width, height, title="", fontsize=12):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=fontsize)
    return fig


def png_bytes(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def finish_axes(ax, title, xlabel, ylabel, legend=True):
    """What every curve panel shares: whole steps or epochs, a light grid, a small legend."""
    ax.set_title(title, fontsize=10)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def _column(records, key, x="step"):
    """(x values, values) of the records that hold a finite `key` and a number `x`."""
    kept = [r for r in records if isinstance(r.get(key), (int, float))
            and math.isfinite(r[key]) and isinstance(r.get(x), (int, float))]
    return [r[x] for r in kept], [r[key] for r in kept]


def spans_decades(values, factor=10.0):
    """Whether a log axis reads better: all values positive and at least `factor` apart."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= factor


def curve_panels(quality, variant, num_codes, band):
    """The training-curve panels: (key, title, y label, log scale (None: where the values span
    a decade), guide line (value, label) or None, min-max band). `variant`: I-IV or vMF."""
    vmf, all_codes = variant == "vMF", (num_codes, f"K = {num_codes}")
    param_axis = r"$\kappa_q$" if vmf else r"$\sigma^2_q$"
    param_title = (r"Quantizer concentration $\kappa_q$ (vMF)" if vmf
                   else rf"Quantizer variance $\sigma^2_q$ (variant {variant})")
    quality_panel = (("acc", "Reconstruction accuracy", "pixel accuracy", False) if quality == "acc"
                     else ("mse_pixel", "Reconstruction MSE per pixel", "MSE per pixel", None))
    return [("loss", "Loss", "loss per image", False, None, False),
            (*quality_panel, None, False),
            ("perplexity", "Code perplexity (per batch)", "perplexity", None, all_codes, False),
            ("param_q", param_title, param_axis + (" (mean, min–max band)" if band else ""), None,
             None, band),
            ("entropy", "Entropy of the code distribution", "nats per latent position", False,
             (math.log(num_codes), f"log K = {math.log(num_codes):.2f}"), False),
            ("codes_used", "Codes in use", "codes", False, all_codes, False)]


def draw_curves(fig, train, val, *, num_codes, quality="mse_pixel", variant="I", band=False,
                train_label="train"):
    """Training curves against the step: `train` records as a line, `val` as markers, `band`:
    the quantizer parameter's min-max band (II-IV). Panels no record has data for are left out."""
    panels = [p for p in curve_panels(quality, variant, num_codes, band)
              if _column(train, p[0])[0] or _column(val, p[0])[0]]
    if not panels:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no training records in metrics.jsonl", ha="center", va="center")
        return [ax.set_title("Training curves").get_text()]
    columns = 3 if len(panels) > 4 else len(panels)
    for i, (key, title, ylabel, log, guide, with_band) in enumerate(panels):
        ax = fig.add_subplot(math.ceil(len(panels) / columns), columns, i + 1)
        steps, values = _column(train, key)
        if steps:
            ax.plot(steps, values, color=TRAIN_COLOR, marker="o" if len(steps) <= 12 else None,
                    markersize=3, lw=1.2, label=train_label)
        low, high = _column(train, "param_q_min")[1], _column(train, "param_q_max")[1]
        spread = low + high if with_band and steps and len(low) == len(high) == len(steps) else []
        if spread:
            ax.fill_between(steps, low, high, color=TRAIN_COLOR, alpha=0.2, lw=0,
                            label="train min–max")
        v_steps, v_values = _column(val, key)
        if v_steps:
            ax.plot(v_steps, v_values, ls="none", marker="s", ms=6, color=VAL_COLOR, mec="black",
                    mew=0.6, label="val (deterministic)", zorder=3)
        if guide is not None and guide[0]:
            ax.axhline(guide[0], color=GUIDE_COLOR, ls="--", lw=0.8, label=guide[1])
        if log is True or (log is None and spans_decades(values + v_values + spread)):
            ax.set_yscale("log")
        else:  # the values themselves: an offset ("+1.0499") above the axis is easy to miss
            ax.ticklabel_format(axis="y", useOffset=False)
        finish_axes(ax, title, "training step", ylabel)
    return [panel[1] for panel in panels]


def draw_codebook(fig, usage, split="test"):
    """Code usage (util.codes.CodeUsage) over a split, most used first, and the cumulative share."""
    size, total, used = len(usage.counts), usage.total, usage.codes_used
    share = np.sort(usage.counts)[::-1] / max(total, 1)
    ax = fig.add_subplot()
    ax.bar(np.arange(1, size + 1), share, width=1.0, color=TRAIN_COLOR, label="share of positions")
    ax.set(xlim=(0.5, size + 0.5), xlabel="code rank (most used first)",
           ylabel="share of latent positions")
    if used and share[0] / share[used - 1] >= 100:  # a long tail is invisible on a linear axis
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    cumulative = ax.twinx()
    cumulative.plot(np.arange(1, size + 1), np.cumsum(share), color=VAL_COLOR, lw=1.5,
                    label="cumulative share")
    cumulative.set(ylim=(0, 1.05), ylabel="cumulative share")
    handles = ax.get_legend_handles_labels()[0] + cumulative.get_legend_handles_labels()[0]
    cumulative.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    title = (f"Codebook usage on the {split} split ({total:,} positions)\n"
             f"perplexity {usage.perplexity:.1f} of K = {size}, {used} of {size} codes in use")
    return [ax.set_title(title, fontsize=10).get_text()]


def draw_reconstructions(fig, originals, reconstructions, caption="", columns=8):
    """Originals, each row above the row of their reconstructions (N x C x H x W, in [0, 1])."""
    from util.grid import reconstruction_grid  # torch, only for a report (not for --curves)
    grid, centres = reconstruction_grid(originals, reconstructions, columns)
    ax = fig.add_subplot()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([y for y, _ in centres], [label for _, label in centres], fontsize=8)
    ax.tick_params(axis="y", length=0)
    title = (f"First {len(originals)} test images and their reconstructions from the "
             "deterministic codes" + (f"\n{caption}" if caption else ""))
    return [ax.set_title(title, fontsize=10).get_text()]


def report_figures(curves, codebook, reconstructions, title=""):
    """``{name: (figure, titles)}``: report_curves, report_codebook, report_reconstructions and
    the combined report; each part gets the keyword arguments of its ``draw_*`` function."""
    parts = (("report_curves", draw_curves, curves, CURVES_SIZE),
             ("report_codebook", draw_codebook, codebook, CODEBOOK_SIZE),
             ("report_reconstructions", draw_reconstructions, reconstructions, RECON_SIZE))
    out = {name: (fig, draw(fig, **kwargs)) for name, draw, kwargs, size in parts
           for fig in [new_figure(*size)]}
    report = new_figure(CURVES_SIZE[0], CURVES_SIZE[1] + CODEBOOK_SIZE[1] + 0.6, title)
    top, bottom = report.subfigures(2, 1, height_ratios=[CURVES_SIZE[1], CODEBOOK_SIZE[1]])
    places = (top, *bottom.subfigures(1, 2, width_ratios=[1, 1.15]))
    titles = [text for place, (_, draw, kwargs, _) in zip(places, parts)
              for text in draw(place, **kwargs)]
    return {**out, "report": (report, titles)}


PANELS = (  # (record split, key, panel title, y label, SQ-VAE only)
    ("val", "mse_pixel", "Validation MSE per pixel", "MSE / pixel", False),
    ("val", "perplexity_split", "Validation perplexity (whole split)", "perplexity", False),
    ("val", "codes_used", "Validation codes in use", "codes", False),
    ("val", "entropy", "Code entropy per position (SQ-VAE, validation)", "nats", True),
    ("train", "param_q", r"Quantizer variance $\sigma^2_q$ (SQ-VAE, epoch mean)", r"$\sigma^2_q$",
     True),
    # VQ-VAE runs of before 2026-12 recorded a constant temperature and a zero entropy.
    ("train", "temperature", "Gumbel-softmax temperature (SQ-VAE, end of epoch)",
     r"$\tau$", True))


def epoch_series(records, split, key):
    """(epochs, values) of the finite `key` in `split` records; an epoch's last record wins."""
    by_epoch = dict(zip(*_column([r for r in records if r.get("split") == split], key, "epoch")))
    return sorted(by_epoch), [value for _, value in sorted(by_epoch.items())]


def draw_learning_curves(fig, runs):
    """Draw the panels some of `runs`, (label, records) pairs, has data for; their titles."""
    sqvae = [any("param_q" in r for r in records if r.get("split") == "train")
             for _, records in runs]
    drawn = []
    for split, key, title, ylabel, sqvae_only in PANELS:
        series = [(label, *epoch_series(records, split, key))
                  for (label, records), sq in zip(runs, sqvae) if sq or not sqvae_only]
        if series := [(label, epochs, values) for label, epochs, values in series if epochs]:
            drawn.append((title, ylabel, series))
    axes = fig.subplots(max(1, math.ceil(len(drawn) / 3)), 3, squeeze=False).ravel()
    for ax, (title, ylabel, series) in zip(axes, drawn):
        for label, epochs, values in series:
            ax.plot(epochs, values, lw=1.4, label=label, marker="." if len(epochs) < 20 else None)
        if spans_decades([v for _, _, values in series for v in values], factor=4.0):
            ax.set_yscale("log")
        few = len(series) <= 12  # a legend of more runs would cover the curves: titles count them
        finish_axes(ax, title if few else f"{title} ({len(series)} runs)", "epoch", ylabel,
                    legend=few)
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    return [title for title, _, _ in drawn]


def learning_curves_png(runs, title=""):
    """PNG bytes of the learning-curve figure of `runs`, and the titles of its panels."""
    titles = draw_learning_curves(fig := new_figure(15, 8, title, fontsize=11), runs)
    return png_bytes(fig), titles
