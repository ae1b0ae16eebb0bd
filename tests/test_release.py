"""Interoperability with the authors' release (github.com/sony/sqvae, vision/).

Facts from running the release, shipped under tests/release/ (see its README): the sha256
of every initial tensor for seed 0 in its eight experiment files, and a genuine run folder
(configs.json, best.pt, stdout.txt). Our models must start from the same weights bit for bit,
evaluate its run folder to the Test line it printed, and print its lines under --dbg.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil

import pytest
import torch

import main
from configs import load_config
from networks import build_model
from tests.test_import_graph import import_graph
from trainer import release, release_format, runs

HERE = os.path.dirname(os.path.abspath(__file__))
HASHES = os.path.join(HERE, "release", "hashes_seed0.txt")
RELEASE_RUN = os.path.join(HERE, "release", "mnist_gauss_1_seed3")


def read_hashes():
    """{experiment: [(key, dtype, shape, sha256)]} in the release's registration order."""
    table, current = {}, None
    with open(HASHES) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                current = table.setdefault(line.strip("[]"), [])
                continue
            key, dtype, shape, digest = line.split("\t")
            current.append((key, dtype, shape, digest))
    return table


HASH_TABLE = read_hashes()


def sha256(tensor):
    return hashlib.sha256(tensor.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def test_the_hash_file_covers_the_eight_release_experiments():
    assert sorted(HASH_TABLE) == sorted([
        "mnist_gauss_1", "fashion-mnist_gauss_1", "cifar10_gauss_1", "celeba_gauss_1",
        "celeba_gauss_2", "celeba_gauss_3", "celeba_gauss_4", "celebamask_vmf"])


@pytest.mark.parametrize("name", sorted(HASH_TABLE))
def test_seed_0_gives_the_release_initial_weights_bit_for_bit(name):
    torch.manual_seed(0)
    ours = build_model(load_config(name)).state_dict()
    expected = HASH_TABLE[name]
    assert sorted(release_format.our_key(k) for k, *_ in expected) == sorted(ours)
    wrong = []
    for key, dtype, shape, digest in expected:
        tensor = ours[release_format.our_key(key)]
        if key == "log_kappa_inv":  # (1,) in the release, a scalar here: same bytes
            tensor = tensor.reshape(1)
        assert str(tensor.dtype).removeprefix("torch.") == dtype, key
        assert str(tuple(tensor.shape)) == shape, key
        if sha256(tensor) != digest:
            wrong.append(key)
    assert wrong == []


def test_cifar10_vmf_follows_the_same_construction():
    # Not one of the release's eight files: it must build, for seed 0, exactly the networks
    # and codebook of cifar10_gauss_1 (docs/model.md §8); only its own initial log kappa-ish
    # scalar (model.log_param_q_init = log 0.05) differs.
    torch.manual_seed(0)
    vmf = build_model(load_config("cifar10_vmf")).state_dict()
    torch.manual_seed(0)
    gauss = build_model(load_config("cifar10_gauss_1")).state_dict()
    assert vmf.keys() == gauss.keys()
    s = "quantizer.log_param_q_scalar"
    assert [k for k in gauss if not torch.equal(vmf[k], gauss[k])] == [s]
    assert vmf[s].item() == pytest.approx(math.log(0.05))


def file_digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def recorded_test_lines():
    with open(os.path.join(RELEASE_RUN, "stdout.txt")) as f:
        return [line.rstrip("\n") for line in f if line.startswith("Test ")]


def parse_line(line):
    return {k.lower(): float(v) for k, v in re.findall(r"(\w+): ([-\d.]+)", line)}


@pytest.fixture(scope="module")
def evaluated_release_run(tmp_path_factory, small_data):
    """A copy of the release run folder after `-ts RUN --dbg` on the full MNIST test split
    (shipped with the subsets); yields (folder, printed lines)."""
    run = tmp_path_factory.mktemp("release") / "resnet_seed3_1125_1927"
    shutil.copytree(RELEASE_RUN, run)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main.run(["-c", "mnist_gauss_1.yaml", "-ts", str(run), "--dbg",
                         "path_dataset", small_data]) == 0
    return run, out.getvalue().splitlines()


def test_release_run_evaluates_to_its_recorded_test_line(evaluated_release_run):
    run, lines = evaluated_release_run
    deterministic = parse_line(recorded_test_lines()[1])
    ours = [parse_line(line) for line in lines if line.startswith("Test ")]
    assert len(ours) == 2
    # Loss 1018.8584, MSE 15.1596, Perplexity 24.0974: the same weights and the same batches
    # of 32, so only float32 summation order may differ.
    for key in ("loss", "mse", "perplexity"):
        assert ours[1][key] == pytest.approx(deterministic[key], rel=2e-5), key
    # Nothing recorded in the release's folder: it stays byte for byte as it was.
    assert file_digests(run) == file_digests(RELEASE_RUN)
    assert any(line.startswith(f"not recorded: {run} is a run folder of the authors' release")
               for line in lines)


def test_dbg_prints_the_release_test_lines_in_its_format(evaluated_release_run):
    _, lines = evaluated_release_run
    mine = [line for line in lines if line.startswith("Test ")]
    # Same text up to the digits: padded name, keys, separators, decimals.
    assert [re.sub(r"\d+", "9", line) for line in mine] == \
        [re.sub(r"\d+", "9", line) for line in recorded_test_lines()]


def printed_shape(lines, run_dir):
    """The lines from "Complete dataload" on, digits collapsed and the run folder named."""
    lines = lines[lines.index("Complete dataload"):]
    return ["<run folder>" if line.rstrip("/").endswith(os.path.basename(run_dir)) else
            re.sub(r"\d+", "9", line) for line in lines]


def test_dbg_training_prints_the_release_lines_in_order(tmp_path, small_data):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main.run(["-c", "mnist_gauss_1.yaml", "--save", "--dbg", "--seed", "3",
                         "--limit-batches", "3", "train.epoch_max", "2", "path",
                         str(tmp_path), "path_dataset", small_data]) == 0
    (run,) = tmp_path.glob("*/*")
    with open(os.path.join(RELEASE_RUN, "stdout.txt")) as f:
        printed = f.read().splitlines()
    ours = printed_shape(out.getvalue().splitlines(), run)
    expected = printed_shape(printed, "resnet_seed3_1125_1927")
    # Epoch 2 may or may not improve on epoch 1 in a 3-batch run: both lines are the release's.
    not_saved = "----Not saving model! Last saved: 9"
    assert [line if line != not_saved else "----Saving model!" for line in ours] == expected


def test_import_writes_a_run_of_ours_and_leaves_the_release_folder_alone(tmp_path):
    run = tmp_path / "release"
    shutil.copytree(RELEASE_RUN, run)
    before = file_digests(run)
    dest = tmp_path / "ours"
    assert release.main(["import", str(run), "--to", str(dest)]) == 0
    assert file_digests(run) == before
    assert sorted(os.listdir(dest)) == ["best.pt", "config.yaml", "metrics.jsonl"]
    imported = torch.load(dest / "best.pt", weights_only=True)["model"]
    theirs = torch.load(run / "best.pt", weights_only=True)
    assert len(imported) == len(theirs)
    for key, value in theirs.items():
        assert key.startswith("module.")
        assert torch.equal(imported[release_format.our_key(key)], value)
    cfg = load_config(str(dest / "config.yaml"))
    assert (cfg.train.bs, cfg.test.bs, cfg.quantization.size_dict) == (32, 32, 128)
    # Importing twice into the same place is refused; the first import stays.
    assert release.main(["import", str(run), "--to", str(dest)]) == 2
    assert release.main(["import", str(dest)]) == 2  # ours is not a release folder


def test_release_checkpoint_keys_map_onto_ours():
    assert release_format.our_key("module.encoder.conv.0.0.weight") == "encoder.stem.0.weight"
    assert release_format.our_key("module.encoder.conv.3.bias") == "encoder.stem.3.bias"
    assert release_format.our_key("module.encoder.res_m.1.weight") == "encoder.head_mean.1.weight"
    assert release_format.our_key("encoder.res_v.0.bias") == "encoder.head_log_var.0.bias"
    assert release_format.our_key("module.decoder.convt.2.weight") == "decoder.head.2.weight"
    assert release_format.our_key("module.codebook") == "quantizer.codebook"


def test_release_folders_are_read_through_the_release_module_alone():
    # trainer.runs reads them through trainer/release_format.py, and knows nothing of their
    # format.
    assert release_format.is_release_run(RELEASE_RUN)
    assert not release_format.is_release_run(os.path.dirname(RELEASE_RUN))
    cfg, model, state = runs.load_run_model(RELEASE_RUN)
    assert (cfg.model.name, cfg.test.bs, state["epoch"]) == ("GaussianSQVAE", 32, None)
    weights = torch.load(os.path.join(RELEASE_RUN, "best.pt"), weights_only=True)
    assert torch.equal(model.state_dict()["encoder.stem.0.weight"],
                       weights["module.encoder.conv.0.weight"])
    graph = import_graph()
    assert "trainer.release" not in graph["trainer.runs"]
    assert "trainer.runs" not in graph["trainer.release_format"]  # it registers nothing there
    with open(runs.__file__) as f:
        assert release_format.CONFIG_FILE not in f.read()


def test_label_model_dbg_lines_follow_the_release():
    from trainer.logs import Display
    lines = []
    display = Display(dbg=True, labels=True, log=lines.append)
    train = {"loss": 1.5, "acc": 0.25, "perplexity": 3.0}
    val = {"loss": 2.0, "acc": 0.5, "perplexity": 4.0, "pixel_acc": 0.75, "miou": 0.125}
    display.epoch(7, 10, 70, [(train, 1.0), (val, 2.0), (val, 3.0)], False, 5)
    assert lines == [
        "[Epoch=7]",
        "Train           Loss: 1.5000, ACC: 0.2500, Perplexity: 3.0000, Time: 1.000 sec",
        "Val             Loss: 2.0000, ACC: 0.5000, Perplexity: 4.0000, Time: 2.000 sec",
        "PixAcc: 0.7500 mIoU: 0.1250",
        "Val             Loss: 2.0000, ACC: 0.5000, Perplexity: 4.0000, Time: 3.000 sec",
        "PixAcc: 0.7500 mIoU: 0.1250",
        "----Not saving model! Last saved: 5",
    ]


def test_a_release_dataset_root_trains_unchanged(tmp_path, small_data, capsys):
    # The release keeps MNIST in <root>/MNIST/MNIST/raw/.
    root = tmp_path / "datasets"
    shutil.copytree(os.path.join(small_data, "MNIST", "raw"), root / "MNIST" / "MNIST" / "raw")
    assert main.run(["-c", "mnist_gauss_1.yaml", "--limit-batches", "2", "train.epoch_max",
                     "1", "path_dataset", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"MNIST: using {root / 'MNIST' / 'MNIST' / 'raw'} (the authors' layout)" in out
    assert "test (" in out


@pytest.mark.parametrize("flags", [["--report"], ["--encode", "test"], ["--prior"],
                                   ["--sample", "4"]])
def test_what_writes_into_a_release_run_folder_is_refused(tmp_path, small_data, capsys,
                                                          flags):
    # A release folder stays byte for byte as it was; the line says how to get a run of
    # ours (python -m trainer.release import), where these write.
    run = tmp_path / "release"
    shutil.copytree(RELEASE_RUN, run)
    assert main.run(["-c", "mnist_gauss_1.yaml", "-ts", str(run), *flags,
                     "path_dataset", small_data]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {flags[0]} writes into the run folder, and {run} is a run "
                           "folder of the authors' release") and "trainer.release import" in line
    assert file_digests(run) == file_digests(RELEASE_RUN)
