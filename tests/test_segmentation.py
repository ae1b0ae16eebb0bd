import pytest
import torch
import torch.nn.functional as F

from third_party.segmentation import SegmentationMeter, colorize, label_palette

# Two 3x4 maps. Channel 19 is the spare decoder channel that belongs to no class.
LABEL = torch.tensor(
    [
        [[0, 0, 1, 1],
         [0, 1, 1, 2],
         [0, 0, 2, 2]],
        [[2, 2, 1, 0],
         [2, 1, 1, 0],
         [1, 1, 0, 0]],
    ]
)
PRED = torch.tensor(
    [
        [[0, 1, 1, 1],
         [0, 1, 19, 2],
         [0, 19, 2, 0]],
        [[2, 2, 1, 0],
         [19, 1, 2, 0],
         [1, 0, 0, 19]],
    ]
)

# Hand count, (true, predicted) -> pixels, over both images:
#   true 0 (9 px): ->0: 3 + 3 = 6, ->1: 1, ->19: 1 + 1 = 2
#   true 1 (9 px): ->1: 3 + 3 = 6, ->0: 1, ->2: 1, ->19: 1
#   true 2 (6 px): ->2: 2 + 2 = 4, ->0: 1, ->19: 1
EXPECTED_ROWS = {
    0: {0: 6, 1: 1, 19: 2},
    1: {0: 1, 1: 6, 2: 1, 19: 1},
    2: {0: 1, 2: 4, 19: 1},
}
# correct = 6 + 6 + 4 = 16 of 24 labelled pixels -> 2/3.
# (Dropping the 4 channel-19 pixels would wrongly give 16/20 = 0.8.)
EXPECTED_ACC = 16 / 24
# IoU_0: inter 6, |label=0| 9, |pred=0| 6+1+1 = 8, union 9+8-6 = 11 -> 6/11
# IoU_1: inter 6, |label=1| 9, |pred=1| 1+6   = 7, union 9+7-6 = 10 -> 6/10
# IoU_2: inter 4, |label=2| 6, |pred=2| 1+4   = 5, union 6+5-4 = 7  -> 4/7
# classes 3..18 are absent from both -> 0.
EXPECTED_IOU = [6 / 11, 6 / 10, 4 / 7] + [0.0] * 16
# mIoU = (0.545454.. + 0.6 + 0.571428..) / 19 = 1.716883.. / 19 = 0.0903623..
EXPECTED_MIOU = (6 / 11 + 6 / 10 + 4 / 7) / 19


def _expected_confusion():
    conf = torch.zeros(19, 20, dtype=torch.int64)
    for t, row in EXPECTED_ROWS.items():
        for p, n in row.items():
            conf[t, p] = n
    return conf


def _check_metrics(res):
    assert isinstance(res["pixel_acc"], float) and isinstance(res["miou"], float)
    assert res["pixel_acc"] == pytest.approx(EXPECTED_ACC, abs=1e-12)
    assert len(res["iou"]) == 19
    assert res["iou"] == pytest.approx(EXPECTED_IOU, abs=1e-9)
    assert res["miou"] == pytest.approx(EXPECTED_MIOU, abs=1e-9)
    assert res["miou"] == pytest.approx(0.0903623, abs=1e-7)


def test_hand_computed_example():
    meter = SegmentationMeter(num_classes=19, num_channels=20)
    meter.update(PRED, LABEL)
    assert meter.confusion.dtype == torch.int64
    assert torch.equal(meter.confusion, _expected_confusion())
    _check_metrics(meter.compute())


def test_update_from_logits_uses_all_channels():
    # Smooth scores whose argmax is PRED, including the spare channel 19.
    logits = F.one_hot(PRED, 20).permute(0, 3, 1, 2).float() * 3.0 + 0.1 * torch.rand(2, 20, 3, 4)
    for label in (LABEL, LABEL[:, None]):
        meter = SegmentationMeter(19, 20)
        meter.update_from_logits(logits, label)
        assert torch.equal(meter.confusion, _expected_confusion())
        _check_metrics(meter.compute())


def test_accumulating_batches_equals_one_batch():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 19, (6, 8, 8), generator=g)
    noise = torch.randint(0, 20, (6, 8, 8), generator=g)
    pred = torch.where(torch.rand(6, 8, 8, generator=g) < 0.6, label, noise)
    whole = SegmentationMeter(19, 20)
    whole.update(pred, label)
    parts = SegmentationMeter(19, 20)
    parts.update(pred[:2], label[:2])
    parts.update(pred[2:], label[2:])
    assert torch.equal(whole.confusion, parts.confusion)
    assert whole.confusion.sum().item() == 6 * 8 * 8
    assert whole.compute() == parts.compute()
    # merge() is the same as updating one meter with both halves.
    a, b = SegmentationMeter(19, 20), SegmentationMeter(19, 20)
    a.update(pred[:3], label[:3])
    b.update(pred[3:], label[3:])
    a.merge(b)
    assert torch.equal(a.confusion, whole.confusion)
    # Metrics are pooled over the split, not averaged per batch.
    first, second = SegmentationMeter(19, 20), SegmentationMeter(19, 20)
    first.update(PRED[:1], LABEL[:1])
    second.update(PRED[1:], LABEL[1:])
    first.merge(second)
    _check_metrics(first.compute())


def test_reset_and_out_of_range_labels():
    meter = SegmentationMeter(19, 20)
    meter.update(PRED, LABEL)
    meter.reset()
    assert meter.confusion is None
    # An ignore label (255) is left out entirely; valid pixels still count.
    label = LABEL.clone()
    label[0, 0, 0] = 255
    meter.update(PRED, label)
    expected = _expected_confusion()
    expected[0, 0] -= 1
    assert torch.equal(meter.confusion, expected)
    assert meter.compute()["pixel_acc"] == pytest.approx(15 / 23)


def test_small_meter_miou_over_present_classes():
    # Same maps seen by a 3-class / 4-channel meter: channel 3 plays the role of 19.
    meter = SegmentationMeter(num_classes=3, num_channels=4)
    meter.update(torch.where(PRED == 19, 3, PRED), LABEL)
    res = meter.compute()
    assert res["pixel_acc"] == pytest.approx(2 / 3)
    # (6/11 + 6/10 + 4/7) / 3 = 1.716883.. / 3 = 0.572294..
    assert res["miou"] == pytest.approx(0.5722944, abs=1e-7)


def test_palette_values():
    pal = label_palette()
    assert pal.shape == (19, 3) and pal.dtype == torch.uint8
    expected = [
        [0, 0, 0],  # background
        [204, 0, 0],  # skin
        [76, 153, 0],  # nose
        [204, 204, 0],  # eye_g
        [51, 51, 255],  # l_eye
        [204, 0, 204],  # r_eye
        [0, 255, 255],  # l_brow
        [255, 204, 204],  # r_brow
        [102, 51, 0],  # l_ear
        [255, 0, 0],  # r_ear
        [102, 204, 0],  # mouth
        [255, 255, 0],  # u_lip
        [0, 0, 153],  # l_lip
        [0, 0, 204],  # hair
        [255, 51, 153],  # hat
        [0, 204, 204],  # ear_r
        [0, 51, 0],  # neck_l
        [255, 153, 51],  # neck
        [0, 204, 0],  # cloth
    ]
    assert pal.tolist() == expected
    assert len({tuple(c) for c in pal.tolist()}) == 19


def test_colorize():
    labels = torch.tensor([[[0, 1], [13, 19]]])
    for lab in (labels, labels[:, None]):
        rgb = colorize(lab)
        assert rgb.shape == (1, 3, 2, 2) and rgb.dtype == torch.float32
        assert rgb.min() >= 0 and rgb.max() <= 1
        assert rgb[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]
        assert torch.allclose(rgb[0, :, 0, 1], torch.tensor([204.0, 0, 0]) / 255)
        assert torch.allclose(rgb[0, :, 1, 0], torch.tensor([0.0, 0, 204]) / 255)
        assert rgb[0, :, 1, 1].tolist() == [1.0, 1.0, 1.0]  # spare channel -> white
