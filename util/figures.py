"""Figures of a run report, drawn from plain data (metric records, code usage, images).

Every ``draw_*`` function draws into a Figure or SubFigure and returns the titles of the axes
it made, so the same code fills the separate panels and the combined ``report.png``. Figures
are rendered by the Agg canvas directly, without pyplot: nothing needs a display, no global
figure registry grows, and an interactive session keeps its own backend.
"""
import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TRAIN_COLOR, VAL_COLOR, GUIDE_COLOR = "tab:blue", "tab:orange", "0.45"
DPI = 100


def new_figure(width, height):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def finish_axes(ax, title, xlabel, ylabel, legend=True):
    """What every curve panel shares: whole steps or epochs, a light grid, a small legend."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def _column(records, key):
    """(steps, values) of the records that hold a finite `key`."""
    kept = [r for r in records if isinstance(r.get(key), (int, float))
            and math.isfinite(r[key]) and isinstance(r.get("step"), (int, float))]
    return [r["step"] for r in kept], [r[key] for r in kept]


def spans_decades(values, factor=10.0):
    """Whether a log axis reads better: all values positive and at least `factor` apart."""
    positive = [v for v in values if v > 0]
    return bool(positive) and len(positive) == len(values) \
        and max(positive) / min(positive) >= factor


def quantizer_label(variant):
    """Axis label and title of the quantizer parameter panel for a variant's display name (the
    quantizer layer's `label`: I-IV, or vMF)."""
    if variant == "vMF":
        return r"$\kappa_q$", r"Quantizer concentration $\kappa_q$ (vMF)"
    return r"$\sigma^2_q$", rf"Quantizer variance $\sigma^2_q$ (variant {variant})"


def curve_panels(quality, variant, num_codes, band):
    """The training-curve panels: (key, title, y label, log scale (None: where the values span
    a decade), guide line as (value, label) or None, draw the min-max band)."""
    param_axis, param_title = quantizer_label(variant)
    if quality == "acc":
        quality_panel = ("acc", "Reconstruction accuracy", "pixel accuracy", False, None, False)
    else:
        quality_panel = ("mse_pixel", "Reconstruction MSE per pixel", "MSE per pixel", None,
                         None, False)
    return [
        ("loss", "Loss", "loss per image", False, None, False),
        quality_panel,
        ("perplexity", "Code perplexity (per batch)", "perplexity", None,
         (num_codes, f"K = {num_codes}"), False),
        ("param_q", param_title, param_axis + (" (mean, min–max band)" if band else ""), None,
         None, band),
        ("entropy", "Entropy of the code distribution", "nats per latent position", False,
         (math.log(num_codes), f"log K = {math.log(num_codes):.2f}"), False),
        ("codes_used", "Codes in use", "codes", False, (num_codes, f"K = {num_codes}"), False),
    ]


def draw_curves(fig, train, val, *, quality="mse_pixel", variant="I", band=False,
                num_codes=None, train_label="train"):
    """Training curves against the step: `train` records as a line, `val` records as markers,
    `band`: the quantizer parameter's min-max band (variants II-IV). Panels whose key no record
    holds are left out."""
    panels = [p for p in curve_panels(quality, variant, num_codes or 0, band)
              if _column(train, p[0])[0] or _column(val, p[0])[0]]
    if not panels:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no training records in metrics.jsonl", ha="center", va="center")
        ax.set_title("Training curves")
        return ["Training curves"]
    columns = 3 if len(panels) > 4 else len(panels)
    rows = math.ceil(len(panels) / columns)
    titles = []
    for i, (key, title, ylabel, log, guide, with_band) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        steps, values = _column(train, key)
        marker = "o" if len(steps) <= 12 else None
        if steps:
            ax.plot(steps, values, color=TRAIN_COLOR, marker=marker, markersize=3, lw=1.2,
                    label=train_label)
        spread = []
        if with_band and steps:
            low, high = _column(train, "param_q_min")[1], _column(train, "param_q_max")[1]
            if len(low) == len(high) == len(steps):
                ax.fill_between(steps, low, high, color=TRAIN_COLOR, alpha=0.2, lw=0,
                                label="train min–max")
                spread = low + high
        v_steps, v_values = _column(val, key)
        if v_steps:
            ax.plot(v_steps, v_values, ls="none", marker="s", markersize=6, color=VAL_COLOR,
                    markeredgecolor="black", markeredgewidth=0.6, label="val (deterministic)",
                    zorder=3)
        if guide is not None and guide[0]:
            ax.axhline(guide[0], color=GUIDE_COLOR, ls="--", lw=0.8, label=guide[1])
        if log is True or (log is None and spans_decades(values + v_values + spread)):
            ax.set_yscale("log")
        else:
            # An offset ("+1.0499") above the axis is easy to miss; show the values themselves.
            ax.ticklabel_format(axis="y", useOffset=False)
        finish_axes(ax, title, "training step", ylabel)
        titles.append(title)
    return titles


def draw_codebook(fig, usage, split="test"):
    """Code usage (util.codes.CodeUsage) over a split, codes sorted by frequency (most used
    first), with the cumulative share on a second axis."""
    size, total, used = len(usage.counts), usage.total, usage.codes_used
    share = np.sort(usage.counts)[::-1] / max(total, 1)
    ax = fig.add_subplot()
    ax.bar(np.arange(1, size + 1), share, width=1.0, color=TRAIN_COLOR, label="share of positions")
    ax.set_xlim(0.5, size + 0.5)
    if used and share[0] / share[used - 1] >= 100:
        # A long tail of rare codes is invisible on a linear axis.
        ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("share of latent positions")
    ax.grid(True, axis="y", alpha=0.3)
    cumulative = ax.twinx()
    cumulative.plot(np.arange(1, size + 1), np.cumsum(share), color=VAL_COLOR, lw=1.5,
                    label="cumulative share")
    cumulative.set_ylim(0, 1.05)
    cumulative.set_ylabel("cumulative share")
    handles = ax.get_legend_handles_labels()[0] + cumulative.get_legend_handles_labels()[0]
    cumulative.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    title = (f"Codebook usage on the {split} split ({total:,} positions)\n"
             f"perplexity {usage.perplexity:.1f} of K = {size}, {used} of {size} codes in use")
    ax.set_title(title, fontsize=10)
    return [title]


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
    ax.set_title(title, fontsize=10)
    return [title]


# Figure sizes in inches (width, height) of the separate panels.
CURVES_SIZE, CODEBOOK_SIZE, RECON_SIZE = (15, 8), (7, 4.8), (8, 4.4)


def report_figures(curves, codebook, reconstructions, title=""):
    """``{name: (figure, titles)}``: the combined report and its three panels (report_curves,
    report_codebook, report_reconstructions), each part given the keyword arguments of its
    ``draw_*`` function."""
    out = {}
    fig = new_figure(*CURVES_SIZE)
    out["report_curves"] = (fig, draw_curves(fig, **curves))
    fig = new_figure(*CODEBOOK_SIZE)
    out["report_codebook"] = (fig, draw_codebook(fig, **codebook))
    fig = new_figure(*RECON_SIZE)
    out["report_reconstructions"] = (fig, draw_reconstructions(fig, **reconstructions))

    report = new_figure(CURVES_SIZE[0], CURVES_SIZE[1] + CODEBOOK_SIZE[1] + 0.6)
    top, bottom = report.subfigures(2, 1, height_ratios=[CURVES_SIZE[1], CODEBOOK_SIZE[1]])
    left, right = bottom.subfigures(1, 2, width_ratios=[1, 1.15])
    titles = draw_curves(top, **curves) + draw_codebook(left, **codebook) \
        + draw_reconstructions(right, **reconstructions)
    if title:
        report.suptitle(title, fontsize=12)
    out["report"] = (report, titles)
    return out
