"""CelebAMask-HQ from a (synthetic) public release to mIoU: prepare, train, evaluate."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main
from data import prepare_celebamask_hq
from networks import build_model
from tests.celebamask_fixture import write_release
from trainer.runs import load_checkpoint, load_run_config


def direct_counts(model, label_dir, num_classes=19):
    """Pixel accuracy and mIoU counted with numpy from the model's saved predictions."""
    preds, labels = [], []
    files = sorted(os.listdir(label_dir), key=lambda f: int(f.split(".")[0]))
    for name in files:
        label = np.array(Image.open(os.path.join(label_dir, name)).resize((64, 64), Image.NEAREST))
        x = torch.from_numpy(label.astype(np.int64))[None, None]
        with torch.no_grad():
            x_hat, _ = model.eval()(x, "deterministic")
        preds.append(x_hat.argmax(1)[0].numpy())  # all 20 channels: channel 19 is a miss
        labels.append(label)
    pred, label = np.concatenate(preds).ravel(), np.concatenate(labels).ravel()
    accuracy = (pred == label).mean()
    ious = []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (label == c))
        union = np.sum((pred == c) | (label == c))
        ious.append(inter / (union + 1e-10))
    return accuracy, float(np.mean(ious)), pred


def test_release_to_miou(tmp_path, capsys):
    release, data_root, runs_root = tmp_path / "release", tmp_path / "data", tmp_path / "runs"
    write_release(str(release))
    assert prepare_celebamask_hq.main(["--src", str(release), "--dst", str(data_root),
                                       "--workers", "1", "--size", "64"]) == 0
    opts = ["path", str(runs_root), "path_dataset", str(data_root), "nworker", "0",
            "train.bs", "2", "test.bs", "2", "train.epoch_max", "2"]
    assert main.run(["-c", "celebamask_vmf.yaml", "--save", *opts]) == 0
    (run_dir,) = [os.path.join(root, d) for root, dirs, _ in os.walk(runs_root) for d in dirs
                  if d.startswith("resnet_label_seed0")]
    recorded = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert {r["split"] for r in recorded} >= {"train", "val", "test"}
    assert all("miou" in r and "pixel_acc" in r for r in recorded if r["split"] != "train")

    capsys.readouterr()
    assert main.run(["-c", "celebamask_vmf.yaml", "-ts", run_dir, *opts]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test (best.pt")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        printed = [json.loads(line) for line in f][-1]  # the -ts record
    assert printed["source"] == "-ts"

    cfg = load_run_config(run_dir)
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(os.path.join(run_dir, "best.pt"))["model"])
    accuracy, miou, _ = direct_counts(model, data_root / "CelebAMask-HQ" / "test_label")
    test = [r for r in recorded if r["split"] == "test"][-1]
    for result in (printed, test):
        assert result["pixel_acc"] == pytest.approx(accuracy, abs=1e-9)
        assert result["miou"] == pytest.approx(miou, abs=1e-9)
