"""``main.py -ts RUN --report``: ``report.png`` and its panels ``report_curves.png``,
``report_codebook.png`` and ``report_reconstructions.png`` (docs/usage.md, "Reports and codes")."""
import os

import torch

from util import figures as plots
from util.codes import CodeUsage
from util.io import atomic_write_bytes

from . import export, runs


def training_records(records):
    """(train records, their legend label, val records) of the run's latest training."""
    steps = [r for r in records if r.get("split") == "train_step"]
    val = [r for r in records if r.get("split") == "val"]
    if not steps:
        return [r for r in records if r.get("split") == "train"], "train (epoch mean)", val
    every = {b["step"] - a["step"] for a, b in zip(steps, steps[1:])}
    label = ("train (interval means)" if len(every) != 1 else "train (every step)"
             if every == {1} else f"train (mean over {every.pop()} steps)")
    return steps, label, val


def reconstruction_arrays(model, loader, n=16):
    """The first `n` images of `loader` over their deterministic reconstructions, captioned."""
    images = []
    for x, _ in loader:
        images.append(x)
        if sum(map(len, images)) >= n:
            break
    x = torch.cat(images)[:n]
    x_hat, top, bottom = export.reconstruct(model, x)
    if model.OUTPUTS == "labels":
        correct = x_hat.argmax(1) == x.reshape(x_hat[:, 0].shape)
        caption = f"pixel accuracy {float(correct.float().mean()):.3f}"
    else:
        caption = f"MSE per pixel {float(((x_hat.clamp(0, 1) - x) ** 2).mean()):.4f}"
    return dict(originals=top, reconstructions=bottom, caption=caption)


def report_title(run_dir, cfg, train, records):
    """One line naming the run and its experiment, and one with the latest test result."""
    name = os.path.join(os.path.basename(os.path.dirname(run_dir)), os.path.basename(run_dir))
    last = train[-1] if train else {}
    head = (f"{name}: {cfg.model.name} {cfg.model.param_var_q}, {cfg.dataset.name}, "
            f"K = {cfg.quantization.size_dict}, D = {cfg.quantization.dim_dict}"
            + (f", {last.get('step')} steps ({last.get('epoch')} epochs)" if last else ""))
    test = next((r for r in reversed(records) if r.get("split") == "test"), None)
    if test is None:
        return head
    parts = [("MSE/pixel {:.5f}", "mse_pixel"), ("PSNR {:.2f} dB", "psnr"), ("acc {:.4f}", "acc"),
             ("mIoU {:.4f}", "miou"), ("perplexity (split) {:.1f}", "perplexity_split"),
             ("codes in use {:d}", "codes_used")]
    shown = [text.format(test[k]) for text, k in parts if isinstance(test.get(k), (int, float))]
    return head + f"\ntest (best.pt, epoch {test.get('epoch')}): " + ", ".join(shown)


def write_report(run_dir, cfg, model, test_loader, test_codes=None):
    """Write report.png and its panels into `run_dir`; returns {name: {"path", "titles"}}.
    `test_codes`: the test split's codes where the caller has them (``--encode test``)."""
    records = runs.read_metrics(run_dir)
    train, train_label, val = training_records(records)
    size = cfg.quantization.size_dict
    figures = plots.report_figures(
        curves=dict(train=train, val=val, train_label=train_label, variant=model.quantizer.label,
                    quality="acc" if model.OUTPUTS == "labels" else "mse_pixel", num_codes=size,
                    band=model.encoder.head_log_var is not None),
        codebook=dict(usage=CodeUsage.from_codes(export.encode_split(model, test_loader)
                      if test_codes is None else test_codes, size), split="test"),
        reconstructions=reconstruction_arrays(model, test_loader),
        title=report_title(run_dir, cfg, train, records))
    paths = {name: os.path.join(run_dir, f"{name}.png") for name in figures}
    for name, path in paths.items():
        atomic_write_bytes(path, plots.png_bytes(figures[name][0]))
    return {name: {"path": path, "titles": figures[name][1]} for name, path in paths.items()}
