"""Segmentation metrics and colouring for the 19-class CelebAMask-HQ label maps.

The vMF label decoder emits 20 scores per pixel for 19 classes (N = 2*ceil(19/2) is even), so
the argmax can land on the spare channel 19, which belongs to no class. Such a pixel is a
wrong prediction for its labelled class: it stays in the pixel-accuracy denominator and in
the union of its true class (dropping it, as "ignore out-of-range" would, inflates both)."""
import torch

__all__ = ["SegmentationMeter", "label_palette", "colorize"]

_EPS = 1e-10

# CelebAMask-HQ colours in label order: background, skin, nose, eye_g, l_eye, r_eye, l_brow,
# r_brow, l_ear, r_ear, mouth, u_lip, l_lip, hair, hat, ear_r, neck_l, neck, cloth.
_PALETTE = ((0, 0, 0), (204, 0, 0), (76, 153, 0), (204, 204, 0), (51, 51, 255), (204, 0, 204),
            (0, 255, 255), (255, 204, 204), (102, 51, 0), (255, 0, 0), (102, 204, 0),
            (255, 255, 0), (0, 0, 153), (0, 0, 204), (255, 51, 153), (0, 204, 204), (0, 51, 0),
            (255, 153, 51), (0, 204, 0))


def _one_channel(labels: torch.Tensor, what: str) -> torch.Tensor:
    """B x H x W from B x 1 x H x W; other shapes as they are."""
    if labels.dim() == 4 and labels.shape[1] != 1:
        raise ValueError(f"{what} with 4 dims must have one channel, got {tuple(labels.shape)}")
    return labels[:, 0] if labels.dim() == 4 else labels


class SegmentationMeter:
    """Confusion matrix over a whole split: ``confusion[t, p]`` counts the pixels of true class
    t (0..num_classes-1) predicted as channel p (0..num_channels-1), an int64 tensor on the
    device of the first update (a distributed caller all-reduces it before ``compute()``)."""

    def __init__(self, num_classes: int, num_channels: int):
        if num_channels < num_classes:
            raise ValueError("num_channels must be >= num_classes")
        self.num_classes, self.num_channels = int(num_classes), int(num_channels)
        self.confusion: torch.Tensor | None = None

    def reset(self) -> None:
        self.confusion = None

    def _ensure(self, device: torch.device) -> torch.Tensor:
        if self.confusion is None:
            self.confusion = torch.zeros(self.num_classes, self.num_channels, dtype=torch.int64,
                                         device=device)
        return self.confusion

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch of predicted channel indices and true labels (same shape)."""
        if pred.shape != label.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        conf = self._ensure(pred.device)
        pred, label = (t.flatten().to(device=conf.device, dtype=torch.int64) for t in (pred, label))
        cells = self.num_classes * self.num_channels
        # Values out of range (e.g. an ignore label) go to a spare bin that is discarded:
        # checking them on the host would force a device sync.
        valid = (label >= 0) & (label < self.num_classes) & (pred >= 0) & (pred < self.num_channels)
        flat = torch.where(valid, label * self.num_channels + pred, cells)
        counts = torch.zeros(cells + 1, dtype=torch.int64, device=conf.device)
        # Not torch.bincount, which on CUDA reads the max back to the host to size its output;
        # index_add_ fills a buffer of known size, deterministically for integer counts.
        counts.index_add_(0, flat, torch.ones_like(flat))
        conf += counts[:cells].view(self.num_classes, self.num_channels)

    @torch.no_grad()
    def update_from_logits(self, logits: torch.Tensor, label: torch.Tensor) -> None:
        """logits: B x num_channels x H x W; label: B x H x W or B x 1 x H x W."""
        if logits.dim() != 4 or logits.shape[1] != self.num_channels:
            raise ValueError(f"expected logits of shape B x {self.num_channels} x H x W, got "
                             f"{tuple(logits.shape)}")
        # Argmax over every channel: a pixel a spare one wins is an error (module docstring).
        self.update(logits.argmax(dim=1), _one_channel(label, "label"))

    def merge(self, other: "SegmentationMeter") -> None:
        if (other.num_classes, other.num_channels) != (self.num_classes, self.num_channels):
            raise ValueError("cannot merge meters with different shapes")
        if other.confusion is not None:
            conf = self._ensure(other.confusion.device)
            conf += other.confusion.to(conf.device)

    def compute(self) -> dict:
        """pixel_acc, per-class iou (list) and miou, as Python floats."""
        c = self.num_classes
        empty = torch.zeros(c, self.num_channels)
        conf = (empty if self.confusion is None else self.confusion).detach().cpu().double()
        correct = torch.diagonal(conf[:, :c])  # spare channels are never correct
        labelled = conf.sum(dim=1)  # includes pixels predicted as a spare channel
        predicted = conf[:, :c].sum(dim=0)
        iou = correct / (labelled + predicted - correct + _EPS)  # intersection over union
        total = labelled.sum()
        pixel_acc = (correct.sum() / total).item() if total > 0 else 0.0
        return {"pixel_acc": float(pixel_acc), "iou": iou.tolist(), "miou": iou.mean().item()}


def label_palette() -> torch.Tensor:
    """The 19-class CelebAMask-HQ palette as a uint8 tensor of shape 19 x 3."""
    return torch.tensor(_PALETTE, dtype=torch.uint8)


def colorize(labels: torch.Tensor) -> torch.Tensor:
    """Integer labels (B x H x W or B x 1 x H x W) as float RGB B x 3 x H x W in [0, 1];
    indices outside the palette (e.g. the spare channel 19) white, to stand out."""
    labels = _one_channel(labels, "labels").long()
    if labels.dim() != 3:
        raise ValueError(f"expected B x H x W labels, got {tuple(labels.shape)}")
    n = len(_PALETTE)
    table = torch.cat([label_palette() / 255.0, torch.ones(1, 3)]).to(labels.device)
    idx = torch.where((labels >= 0) & (labels < n), labels, n)
    return table[idx].permute(0, 3, 1, 2).contiguous()
