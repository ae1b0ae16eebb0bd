"""The README's first run: configs/mnist_sample.yaml trains offline on the MNIST sample shipped
in tests/data, says so once, and keeps its runs apart from the paper's; a start that fails on
a missing dataset leaves no folder behind."""
import os

import yaml

import main
from configs import REPO_DIR, SAMPLE_DATA, is_sample_data, load_config

NOTE = "data: the MNIST sample shipped in tests/data/MNIST"


def test_the_sample_experiment_trains_on_the_shipped_sample_and_says_so_once(tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sample is found from any folder
    assert main.run(["-c", "mnist_sample.yaml", "--save", "--limit-batches", "2",
                     "train.epoch_max", "1", "test.bs", "100", "path", "runs"]) == 0
    out = capsys.readouterr().out
    assert out.count(NOTE) == 1
    assert "1,667 train, 333 val, 10,000 test images" in out and "mnist_gauss_1.yaml" in out
    (run,) = (tmp_path / "runs" / "mnist_sample_sqvae_gaussian_1").iterdir()
    with open(run / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["path_dataset"] == SAMPLE_DATA == os.path.join(REPO_DIR, "tests", "data")


def test_the_paper_experiment_never_takes_the_sample():
    assert not is_sample_data(load_config("mnist_gauss_1.yaml", []))
    assert is_sample_data(load_config("mnist_sample.yaml", []))
    # Asked for by hand, the sample is still named as such.
    assert is_sample_data(load_config("mnist_gauss_1.yaml", ["path_dataset", "{repo}/tests/data"]))
    assert load_config("mnist_sample.yaml", []).path_specific != \
        load_config("mnist_gauss_1.yaml", []).path_specific


def test_repo_in_a_path_is_the_repository():
    cfg = load_config("mnist_gauss_1.yaml", ["path", "{repo}/runs", "path_dataset", "{repo}"])
    assert cfg.path == os.path.join(REPO_DIR, "runs") and cfg.path_dataset == REPO_DIR


def test_a_start_without_the_dataset_leaves_no_folder_behind(tmp_path, capsys):
    runs, data = tmp_path / "checkpoints", tmp_path / "datasets"
    assert main.run(["-c", "mnist_gauss_1.yaml", "--save", "path", str(runs),
                     "path_dataset", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: MNIST not found under")
    assert NOTE not in err[0]
    assert sorted(os.listdir(tmp_path)) == []
