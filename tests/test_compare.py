"""python -m trainer.compare: the table of run folders, its CSV, and the reproduction report
(docs/results.md) with the published figures beside it.

The first test reads the brief SQ-VAE and VQ-VAE runs of the session (``mnist_runs``,
tests/conftest.py); the others write run folders by hand, with the values to expect worked
out in the comments. The learning curves of ``--curves`` are tests/test_curves.py's.
"""
import csv
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
import yaml

from trainer import compare, runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_test(run_dir):
    return [r for r in runs.read_metrics(run_dir) if r["split"] == "test"][-1]


def test_compare_table_and_csv(mnist_runs, tmp_path):
    out_csv = tmp_path / "table.csv"
    proc = subprocess.run([sys.executable, "-m", "trainer.compare", *mnist_runs, "--csv",
                           str(out_csv)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith("|---")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert all(len(row) == len(compare.COLUMNS) for row in cells)
    header = cells[0]
    for run_dir, row, label in zip(mnist_runs, cells[2:], ("GaussianSQVAE (gaussian_1)", "VQVAE")):
        test = last_test(run_dir)
        got = dict(zip(header, row))
        assert got["model"] == label and got["dataset"] == "MNIST" and got["epochs"] == "2"
        assert got["run"].endswith(os.path.basename(run_dir))
        assert got["test mse/pixel"] == f"{test['mse_pixel']:.5f}"
        assert got["perplexity (split)"] == f"{test['perplexity_split']:.1f}"
        assert got["codes used"] == str(test["codes_used"])

    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["GaussianSQVAE (gaussian_1)", "VQVAE"]
    for run_dir, row in zip(mnist_runs, table):
        test = last_test(run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            train_seconds = sum(r["seconds"] for r in map(json.loads, f)
                                if r["split"] == "train")
        assert float(row["psnr (dB)"]) == pytest.approx(test["psnr"])
        assert float(row["perplexity (batch)"]) == pytest.approx(test["perplexity"])
        assert float(row["perplexity (split)"]) == pytest.approx(test["perplexity_split"])
        assert int(row["codes used"]) == test["codes_used"]
        assert float(row["train time (s)"]) == pytest.approx(train_seconds)


# ----------------------------------------------------------------------------- compare errors

def fake_run(folder, records, config="model:\n  name: VQVAE\ndataset:\n  name: MNIST\n"):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(config)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


def run_compare(argv, capsys):
    rc = compare.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_compare_run_without_test_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path / "x" / "run", [{"epoch": 1, "split": "train", "seconds": 2.0}])
    rc, out, err = run_compare([run], capsys)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "no test metrics" in err
    assert not (tmp_path / "comparison.csv").exists()


@pytest.mark.parametrize("case", ["missing", "no_config", "no_metrics", "bad_json",
                                  "pickle_config"])
def test_compare_unusable_folders(case, tmp_path, capsys):
    folder = tmp_path / "run"
    if case == "no_config":
        folder.mkdir()
    elif case == "no_metrics":
        fake_run(folder, [])
        os.remove(folder / "metrics.jsonl")
    elif case == "bad_json":
        fake_run(folder, [])
        (folder / "metrics.jsonl").write_text('{"split": "test"}\n{oops\n')
    elif case == "pickle_config":
        # safe_load refuses Python object tags instead of constructing them.
        fake_run(folder, [{"split": "test"}], config="!!python/object/apply:os.system ['true']\n")
    rc, out, err = run_compare([str(folder), "--csv", str(tmp_path / "t.csv")], capsys)
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(folder) in err


def test_compare_defaults_and_missing_values(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    label_map = fake_run(tmp_path / "celebamask_sqvae_vmf" / "run", [
        {"epoch": 1, "split": "train", "seconds": 1.5},
        {"epoch": 2, "split": "train", "seconds": 2.5},
        {"epoch": 2, "split": "test", "perplexity": 3.0, "perplexity_split": 4.0,
         "codes_used": 9},
    ], config="model:\n  name: VmfSQVAE\n  param_var_q: vmf\ndataset:\n  name: CelebAMask_HQ\n")
    rc, out, _ = run_compare([label_map], capsys)
    assert rc == 0
    row = [c.strip() for c in out.splitlines()[2].strip("|").split("|")]
    assert row == ["celebamask_sqvae_vmf/run", "VmfSQVAE (vmf)", "CelebAMask_HQ", "2", "n/a",
                   "n/a", "n/a", "3.0", "4.0", "9", "n/a", "n/a", "n/a", "4.0"]
    assert os.listdir(tmp_path) == ["celebamask_sqvae_vmf"]  # writes only where told
    assert run_compare([label_map, "--csv", "t.csv"], capsys)[0] == 0
    with open(tmp_path / "t.csv", newline="") as f:
        (written,) = list(csv.DictReader(f))
    assert written["test mse/pixel"] == "" and written["train time (s)"] == "4.0"


def test_report_averages_seeds_and_reads_release_folders(tmp_path, capsys):
    def test_record(mse, ppl, codes):
        return {"split": "test", "epoch": 3, "mse": mse, "mse_pixel": mse / 784,
                "psnr": 20.0 + mse, "perplexity": ppl, "perplexity_split": ppl,
                "codes_used": codes}
    root = tmp_path / "runs"
    for seed, (mse, ppl, codes) in enumerate([(2.0, 10.0, 40), (4.0, 20.0, 50),
                                              (6.0, 30.0, 60)]):
        fake_run(root / "mnist_vqvae" / f"resnet_seed{seed}", [
            *({"epoch": e, "split": "train", "seconds": 10.0} for e in (1, 2, 3)),
            test_record(mse, ppl, codes),
            *([{"split": "prior_test", "nll": 1.0 + seed, "unigram": 3.0, "uniform": 4.85,
                "nll_bpd": 0.1, "unigram_bpd": 0.2, "uniform_bpd": 0.4}] if seed < 2 else [])])
    # A folder of the authors' release, evaluated here with -ts: configs.json is JSON.
    release = root / "release" / "resnet_seed3_1125_1927"
    release.mkdir(parents=True)
    (release / "configs.json").write_text(json.dumps(
        {"model": {"name": "GaussianSQVAE", "param_var_q": "gaussian_1"},
         "dataset": {"name": "MNIST"}}))
    (release / "metrics.jsonl").write_text(json.dumps(test_record(15.0, 24.0, 90)) + "\n")
    report = tmp_path / "results.md"
    rc, out, err = run_compare([str(root), "--report", str(report)], capsys)
    assert rc == 0, err
    text = report.read_text()
    assert text.splitlines()[4] == f"    python -m trainer.compare {root} --report {report}"
    # mse/image 2, 4, 6: mean 4, sample std 2; perplexity 10, 20, 30: 20 +- 10; codes
    # 40, 50, 60: 50 +- 10; prior nll of seeds 0 and 1 only: 1, 2 -> 1.5 +- 0.707; train
    # time 30 s each.
    two = "(2 of 3 runs)"
    assert ("| MNIST | VQVAE | 3 | 3 | 4.00 ± 2.00 | 0.00510 ± 0.00255 | 24.00 ± 2.00 "
            f"| 20.0 ± 10.0 | 20.0 ± 10.0 | 50.0 ± 10.0 | 1.500 ± 0.707 {two} "
            f"| 3.000 ± 0.000 {two} | 0.1000 ± 0.0000 {two} | 30.0 ± 0.0 |") in text
    assert ("| MNIST | GaussianSQVAE (gaussian_1), authors' release | n/a | 1 | 15.00 | 0.01913 "
            "| 35.00 | 24.0 | 24.0 | 90.0 | n/a | n/a | n/a | n/a |") in text
    assert "## Published figures" in text and "| 434.8 |" in text
    assert len(out.strip().splitlines()) == 2 + 4  # header, rule, one row per run


def test_compare_opens_no_checkpoint_and_unpickles_nothing(tmp_path, capsys, monkeypatch):
    # Run folders come from other people: only their config and metrics.jsonl are read.
    run = fake_run(tmp_path / "mnist_vqvae" / "run", [{"split": "test", "mse": 1.0}])
    (tmp_path / "mnist_vqvae" / "run" / "best.pt").write_bytes(b"not read")

    def refuse(*args, **kwargs):
        raise AssertionError("compare unpickled something")
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    rc, out, err = run_compare([str(tmp_path), "--csv", str(tmp_path / "t.csv")], capsys)
    assert rc == 0 and err == "" and "| mnist_vqvae/run | VQVAE | MNIST |" in out


def test_published_figures_come_from_their_data_file(tmp_path):
    with open(os.path.join(REPO, "trainer", "published_figures.yaml")) as f:
        rows = yaml.safe_load(f)
    section = compare.published_section(os.path.join(REPO, "docs", "results.md"))
    lines = section.splitlines()
    table = lines[lines.index("| dataset | model | PSNR (dB) | perplexity | source |") + 2:]
    assert table[:len(rows)] == [
        f"| {r['dataset']} | {r['model']} | {'n/a' if r['psnr'] is None else r['psnr']} | "
        f"{r['perplexity']} | {r['source']} |" for r in rows]
    assert table[len(rows)] == ""
    assert ("| CIFAR10 | SQ-VAE (K = 512) | 26.11 | 434.8 | VQ-WAE (Vuong et al., 2023), re-run |"
            in table)
    # A broken data file is one line naming it.
    bad = tmp_path / "figures.yaml"
    bad.write_text("- dataset: MNIST\n")
    with pytest.raises(compare.CompareError, match=re.escape(str(bad))):
        compare.published_figures(str(bad))


def test_the_report_links_the_gpu_command_lines_from_where_it_is(tmp_path):
    # docs/results.md links docs/gpu-runs.md beside it; a report elsewhere links it from there.
    assert "are in [gpu-runs.md](gpu-runs.md)." in compare.published_section(
        os.path.join(REPO, "docs", "results.md"))
    elsewhere = tmp_path / "out" / "report.md"
    elsewhere.parent.mkdir()
    link = re.search(r"\[gpu-runs\.md\]\((.*)\)", compare.published_section(str(elsewhere)))[1]
    assert os.path.samefile(os.path.join(elsewhere.parent, link),
                            os.path.join(REPO, "docs", "gpu-runs.md"))
    with open(os.path.join(REPO, "docs", "gpu-runs.md")) as f:
        commands = f.read()
    assert "python -m trainer.compare --report docs/results.md checkpoints" in commands
    for config in ("cifar10_gauss_1.yaml", "cifar10_vqvae.yaml", "celeba_gauss_1.yaml",
                   "celeba_vqvae.yaml"):
        assert f"python main.py -c {config} --save --seed $seed" in commands


def test_published_mnist_figures_agree_with_those_the_report_text_quotes():
    # Two hands: the data file's table and the sentence of the notes that discusses them.
    rows = {r["model"]: r for r in compare.published_figures() if r["dataset"] == "MNIST"}
    with open(os.path.join(REPO, "benchmarks", "results_notes.md")) as f:
        notes = " ".join(f.read().split())
    sq, vq = rows["SQ-VAE (K = 128)"]["perplexity"], rows["VQ-VAE (K = 128)"]["perplexity"]
    assert f"gives SQ-VAE a codebook perplexity of {sq} and VQ-VAE {vq}." in notes
