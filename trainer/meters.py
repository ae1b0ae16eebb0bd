"""Metrics kept on the device (a training step never waits for the host), all-reduced under
torchrun; `eval_pass`, one pass over a split; `evaluate`, the records of the final test and -ts."""
import math
import time
from itertools import islice

import torch

from util import distributed as dist
from util.codes import CodeUsage


class MeanMeter:
    """Means over batches of per-batch scalars (the release's per-epoch figures)."""

    def __init__(self, keys):
        self.keys, self.sum, self.count = tuple(keys), None, 0

    def add(self, terms):
        """Add a batch's terms; returns them stacked (one device tensor, no sync)."""
        values = torch.stack([terms[k].detach().float() for k in self.keys])
        self.add_values(values)
        return values

    def add_values(self, values):
        self.sum = values if self.sum is None else self.sum + values
        self.count += 1

    def means(self):
        """Means over every batch of every process (one all-reduce under torchrun)."""
        if self.count == 0:
            return {}
        totals = torch.cat([self.sum, self.sum.new_tensor([self.count])])
        totals = dist.all_reduce_sum(totals.clone())
        return dict(zip(self.keys, (totals[:-1] / totals[-1]).tolist()))

    def state_dict(self):
        return {"keys": list(self.keys), "count": self.count,
                "sum": None if self.sum is None else self.sum.cpu()}

    def load_state_dict(self, state, device):
        self.keys, self.count = tuple(state["keys"]), state["count"]
        self.sum = None if state["sum"] is None else state["sum"].to(device)


class CodeHistogram:
    """How often each code is chosen over a whole split."""

    def __init__(self, size):
        self.size, self.counts = size, None

    def add(self, codes):
        codes = codes.reshape(-1)
        if self.counts is None:
            self.counts = torch.zeros(self.size, dtype=torch.long, device=codes.device)
        self.counts.index_add_(0, codes, torch.ones_like(codes))

    def state_dict(self):
        return {"size": self.size, "counts": None if self.counts is None else self.counts.cpu()}

    def load_state_dict(self, state, device):
        self.size = state["size"]
        self.counts = None if state["counts"] is None else state["counts"].to(device)

    def summary(self):
        """Split-level perplexity and codes in use, summed over every process."""
        if self.counts is None:
            return {}
        usage = CodeUsage.from_counts(dist.all_reduce_sum(self.counts.clone()).cpu().numpy())
        return {"perplexity_split": usage.perplexity, "codes_used": usage.codes_used}


def derived_metrics(means, dim_x):
    """Per-pixel MSE and PSNR next to the release's per-image summed MSE."""
    out = dict(means)
    if "mse" in out:
        out["mse_pixel"] = out["mse"] / dim_x
        out["psnr"] = -10 * math.log10(out["mse_pixel"]) if out["mse_pixel"] > 0 else math.inf
    return out


@torch.no_grad()
def eval_pass(model, loader, mode, limit=None, bar=None):
    """One pass in eval mode: means over batches (the release's figures), the split's code
    perplexity, for label maps its pixel accuracy and mIoU."""
    model.eval()
    meter = MeanMeter(model.TERMS)
    histogram = CodeHistogram(model.codebook.shape[0])
    seg = None
    if model.OUTPUTS == "labels":
        from networks import label_channels
        from third_party.segmentation import SegmentationMeter
        seg = SegmentationMeter(model.num_classes, label_channels(model.num_classes))
    for x, _ in islice(loader, limit):
        x_hat, terms = model(x, mode, codes=True)
        meter.add(terms)
        histogram.add(terms["codes"])
        if seg is not None:
            seg.update_from_logits(x_hat, x)
        if bar is not None:
            bar.update(x.shape[0])
    result = {**derived_metrics(meter.means(), model.dim_x), **histogram.summary()}
    if seg is not None and seg.confusion is not None:
        dist.all_reduce_sum(seg.confusion)
        result.update({k: v for k, v in seg.compute().items() if k in ("pixel_acc", "miou")})
    return result


def evaluate_split(model, loader, split, limit, display):
    """(metrics, seconds) of the stochastic, then the deterministic pass (`limit` batches)."""
    limit = len(loader) if limit is None else min(len(loader), limit)
    passes = []
    for mode in ("stochastic", "deterministic"):
        start = time.perf_counter()
        with display.progress(limit * loader.batch_size, f"{split} {mode}") as bar:
            metrics = eval_pass(model, loader, mode, limit, bar)
        passes.append((metrics, time.perf_counter() - start))
    return passes


def evaluate(model, loader, split, epoch, *, limit, display, step=0, **extra):
    """The records "<split>_stochastic" and "<split>" (deterministic) of the test split or
    -ts --images, shown and to TensorBoard at `step` (the weights'); the caller keeps them."""
    stochastic, deterministic = evaluate_split(model, loader, split, limit, display)
    display.test(epoch, stochastic, deterministic, name=split)
    records = [{"epoch": epoch, "split": name, **metrics, "seconds": seconds, **extra}
               for name, (metrics, seconds) in ((f"{split}_stochastic", stochastic),
                                                (split, deterministic))]
    display.records(records, step=step)
    return records
