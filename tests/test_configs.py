"""configs.load_config: the nine experiment files, derived fields, overrides, errors, and the CLI.

Expected values come from docs/model.md §1 (experiment table) and §2 (parameter counts).
"""
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

import configs
from configs import ConfigError, config_to_yaml, load_config
from networks import MODEL_REGISTRY
from tests.release_tables import RELEASE_PARAMS as PARAMS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# docs/model.md §1 experiment table:
# file -> (dataset, shape, model, param_var_q, K, D, num_rb, epochs, log_param_q_init)
EXPERIMENTS = {
    "mnist_gauss_1": ("MNIST", (1, 28, 28), "GaussianSQVAE", "gaussian_1", 128, 64, 2, 100,
                      math.log(10)),
    "fashion-mnist_gauss_1": ("FashionMNIST", (1, 28, 28), "GaussianSQVAE", "gaussian_1", 256,
                              64, 2, 100, math.log(10)),
    "cifar10_gauss_1": ("CIFAR10", (3, 32, 32), "GaussianSQVAE", "gaussian_1", 512, 64, 2, 100,
                        math.log(20)),
    "celeba_gauss_1": ("CelebA", (3, 64, 64), "GaussianSQVAE", "gaussian_1", 512, 64, 6, 70,
                       math.log(20)),
    "celeba_gauss_2": ("CelebA", (3, 64, 64), "GaussianSQVAE", "gaussian_2", 512, 64, 6, 70,
                       math.log(20)),
    "celeba_gauss_3": ("CelebA", (3, 64, 64), "GaussianSQVAE", "gaussian_3", 512, 64, 6, 70,
                       math.log(20)),
    "celeba_gauss_4": ("CelebA", (3, 64, 64), "GaussianSQVAE", "gaussian_4", 512, 64, 6, 70,
                       math.log(20)),
    "celebamask_vmf": ("CelebAMask_HQ", (1, 64, 64), "VmfSQVAE", "vmf", 64, 64, 2, 70,
                       math.log(0.05)),
    "cifar10_vmf": ("CIFAR10", (3, 32, 32), "GaussianSQVAE", "vmf", 512, 64, 2, 100,
                    math.log(0.05)),
}
NAMES = sorted(EXPERIMENTS)
# The derived fields, worked out by hand from that table (C * H * W; a variance head for
# gaussian_2..4; D + 1 for VmfSQVAE only): file -> (dim_x, variance head, quantization.dim_code)
DERIVED = {
    "mnist_gauss_1": (784, False, 64),
    "fashion-mnist_gauss_1": (784, False, 64),
    "cifar10_gauss_1": (3072, False, 64),
    "celeba_gauss_1": (12288, False, 64),
    "celeba_gauss_2": (12288, True, 64),
    "celeba_gauss_3": (12288, True, 64),
    "celeba_gauss_4": (12288, True, 64),
    "celebamask_vmf": (4096, False, 65),
    "cifar10_vmf": (3072, False, 64),  # the vMF quantizer in GaussianSQVAE: no + 1
}



@pytest.fixture(autouse=True)
def _no_env_roots(monkeypatch):
    # The developer's shell may set these; every test starts from the shipped defaults.
    monkeypatch.delenv("SQVAE_CHECKPOINTS", raising=False)
    monkeypatch.delenv("SQVAE_DATA", raising=False)


def test_experiment_files_include_the_nine():
    files = configs.experiment_files()
    assert files == sorted(files)
    assert {n + ".yaml" for n in NAMES} <= set(files)


def test_every_shipped_file_loads():
    # Also any experiment file added beside the nine of the authors' release (e.g. baselines).
    for name in configs.experiment_files():
        cfg = load_config(name, [])
        # What the file says is what the loaded config holds (dataset, model, K and D).
        with open(os.path.join(os.path.dirname(configs.__file__), name)) as f:
            raw = yaml.safe_load(f)
        for section, keys in (("dataset", ("name",)), ("model", ("name", "param_var_q")),
                              ("quantization", ("size_dict", "dim_dict"))):
            for key in keys:
                if key in raw.get(section, {}):
                    assert cfg[section][key] == raw[section][key], (name, section, key)
        assert cfg.is_frozen()
        with pytest.raises(AttributeError):
            cfg.train.lr = 1.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("suffix", ["", ".yaml"])
def test_experiment_file_loads_with_spec_values(name, suffix):
    cfg = load_config(name + suffix, [])
    dataset, shape, model, variant, k, d, num_rb, epochs, log_q = EXPERIMENTS[name]
    assert cfg.is_frozen()
    assert cfg.dataset.name == dataset
    assert tuple(cfg.dataset.shape) == shape
    assert cfg.model.name == model
    assert cfg.model.param_var_q == variant
    assert cfg.quantization.size_dict == k
    assert cfg.quantization.dim_dict == d
    assert cfg.network.num_rb == num_rb
    assert cfg.train.epoch_max == epochs
    assert cfg.model.log_param_q_init == pytest.approx(log_q, abs=1e-12)
    # Defaults of docs/model.md §1 that no experiment file changes.
    assert cfg.train.lr == 0.001 and cfg.train.bs == 32
    assert cfg.quantization.temperature.init == 1.0
    assert cfg.quantization.temperature.decay == 1e-5
    assert cfg.quantization.temperature.min == 0.0
    assert cfg.flags.arelbo is True and cfg.flags.decay is True and cfg.flags.bn is True


def test_celebamask_extras():
    cfg = load_config("celebamask_vmf.yaml", [])
    assert cfg.model.log_kappa_inv == pytest.approx(math.log(0.01), abs=1e-12)
    assert cfg.network.name == "resnet_label"
    assert cfg.network.num_class == 19
    assert cfg.network.act_decoder == "exp"
    for name in NAMES:
        if name != "celebamask_vmf":
            assert load_config(name, []).network.name == "resnet"


@pytest.mark.parametrize("name", NAMES)
def test_derived_fields(name, tmp_path):
    cfg = load_config(name, ["path", str(tmp_path)])
    dim_x, var_q, dim_code = DERIVED[name]
    assert cfg.dataset.dim_x == dim_x
    assert MODEL_REGISTRY[cfg.model.name].reads_log_var(cfg) is var_q  # the networks decide
    assert cfg.quantization.dim_code == dim_code
    assert cfg.path_checkpoint == os.path.join(str(tmp_path), cfg.path_specific)


def test_shape_and_dim_x_follow_the_dataset_name():
    cfg = load_config("mnist_gauss_1", ["dataset.name", "CIFAR10"])
    assert cfg.dataset.shape == (3, 32, 32) and cfg.dataset.dim_x == 3072
    cfg = load_config("mnist_gauss_1", ["dataset.name", "CelebA"])
    assert cfg.dataset.shape == (3, 64, 64) and cfg.dataset.dim_x == 12288


def test_a_file_may_state_the_dataset_shape_and_dim_x_it_has(tmp_path):
    # Experiment files and run folders written before they were derived state them.
    stated, unstated = tmp_path / "stated.yaml", tmp_path / "unstated.yaml"
    stated.write_text("dataset:\n  name: CIFAR10\n  shape: (3, 32, 32)\n  dim_x: 3072\n")
    unstated.write_text("dataset:\n  name: CIFAR10\n")
    cfg = load_config(str(stated))
    assert cfg == load_config(str(unstated))
    assert cfg.dataset.shape == (3, 32, 32) and cfg.dataset.dim_x == 3072
    # As the command line may: the same check.
    cfg = load_config("mnist_gauss_1", ["dataset.shape", "(1, 28, 28)", "dataset.dim_x", "784"])
    assert cfg == load_config("mnist_gauss_1")


@pytest.mark.parametrize("written, message", [
    ("shape: (1, 28, 28)", "config key 'dataset.shape' is (1, 28, 28) but dataset CIFAR10 has "
                           "shape (3, 32, 32); remove the key, it follows dataset.name"),
    ("dim_x: 784", "config key 'dataset.dim_x' is 784 but dataset CIFAR10 has dim_x 3072 "
                   "(C * H * W of (3, 32, 32)); remove the key, it follows dataset.name"),
])
def test_a_wrong_dataset_shape_or_dim_x_names_the_fix(tmp_path, written, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"dataset:\n  name: CIFAR10\n  {written}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == message


@pytest.mark.parametrize("name", NAMES)
def test_path_specific_follows_dataset_and_variant(name):
    # docs/model.md §1: `<dataset>_sqvae_<variant>/`, the dataset spelled as in the file name.
    prefix, _, rest = name.partition("_")
    variant = "vmf" if rest == "vmf" else "gaussian_" + rest[-1]
    assert load_config(name, []).path_specific == f"{prefix}_sqvae_{variant}/"


def test_cifar10_vmf_has_its_own_folder():
    # The reference's cifar10_vmf reuses cifar10_sqvae_gaussian_1/ (docs/model.md §8); ours
    # must not, and no two shipped experiments share a run folder.
    specific = {name: load_config(name, []).path_specific for name in configs.experiment_files()}
    assert specific["cifar10_vmf.yaml"] != "cifar10_sqvae_gaussian_1/"
    assert len(set(specific.values())) == len(specific)


def test_derived_fields_ignore_values_written_in_files(tmp_path):
    # A saved run's config.yaml holds the derived keys; they are recomputed from the real ones
    # (flags.var_q, which run folders of before hold, is dropped: the networks decide it).
    path = tmp_path / "cfg.yaml"
    path.write_text("path_specific: x/\nflags: {var_q: True}\nquantization: {dim_code: 7}\n"
                    "path_checkpoint: /elsewhere\n")
    cfg = load_config(str(path))
    assert "var_q" not in cfg.flags and cfg.quantization.dim_code == 64
    assert cfg.path_checkpoint == os.path.join(cfg.path, "x/")


@pytest.mark.parametrize("key, value, fix", [
    ("path_checkpoint", "/tmp/x", "set path or path_specific"),
    ("quantization.dim_code", "7", "quantization.dim_dict"),
    ("flags.var_q", "True", "model.param_var_q"),
])
def test_overriding_a_derived_key_is_an_error(key, value, fix):
    with pytest.raises(ConfigError, match=f"'{key}' is derived.*{fix}") as error:
        load_config("mnist_gauss_1", [key, value])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("key, value, message", [
    ("train.lr", "-1", "'train.lr' must be greater than 0.0, got -1.0"),
    ("train.lr", "0", "'train.lr' must be greater than 0.0"),
    ("train.bs_per_rank", "-1", "'train.bs_per_rank' must be at least 0, got -1"),
    ("log.every_steps", "0", "'log.every_steps' must be at least 1"),
    ("quantization.temperature.init", "0", "temperature.init' must be greater than 0.0"),
    ("nworker", "-2", "'nworker' must be at least 0"),
])
def test_numbers_out_of_range_are_one_line_errors(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config("mnist_gauss_1", [key, value])
    assert "\n" not in str(error.value)


def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("mnist_gauss_1", ["path", "runs", "path_dataset", "../ds"])
    assert cfg.path == str(tmp_path / "runs")
    assert cfg.path_dataset == os.path.abspath(tmp_path / ".." / "ds")
    assert cfg.path_checkpoint == os.path.join(str(tmp_path / "runs"), "mnist_sqvae_gaussian_1/")


def test_env_sets_default_roots_and_cli_override_wins(monkeypatch, tmp_path):
    ckpt, data_root, other = tmp_path / "ck", tmp_path / "ds", tmp_path / "other"
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(ckpt))
    monkeypatch.setenv("SQVAE_DATA", str(data_root))
    cfg = load_config("cifar10_gauss_1", [])
    assert cfg.path == str(ckpt)
    assert cfg.path_dataset == str(data_root)
    assert cfg.path_checkpoint == os.path.join(str(ckpt), "cifar10_sqvae_gaussian_1/")
    cfg = load_config("cifar10_gauss_1", ["path", str(other), "path_dataset", str(other)])
    assert cfg.path == str(other) and cfg.path_dataset == str(other)
    assert cfg.path_checkpoint == os.path.join(str(other), "cifar10_sqvae_gaussian_1/")


def test_without_env_the_shipped_defaults_apply(monkeypatch, tmp_path):
    # Run folders and datasets default to folders of the current directory, outside the
    # source packages (data/ is a package: a download there would land among its sources).
    monkeypatch.delenv("SQVAE_CHECKPOINTS", raising=False)
    monkeypatch.delenv("SQVAE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("mnist_gauss_1", [])
    assert cfg.path == str(tmp_path / "checkpoints")
    assert cfg.path_dataset == str(tmp_path / "datasets")


def test_override_types_are_coerced():
    cfg = load_config("mnist_gauss_1", ["train.lr", "1", "train.epoch_max", "3",
                                        "flags.bn", "False", "quantization.temperature.min",
                                        "1e-3", "path_specific", "123/"])
    assert type(cfg.train.lr) is float and cfg.train.lr == 1.0
    assert type(cfg.train.epoch_max) is int and cfg.train.epoch_max == 3
    assert cfg.flags.bn is False
    assert cfg.quantization.temperature.min == 0.001
    assert cfg.path_specific == "123/"


def test_overrides_beat_the_experiment_file():
    cfg = load_config("celeba_gauss_1", ["quantization.size_dict", "16", "network.num_rb", "3"])
    assert cfg.quantization.size_dict == 16 and cfg.network.num_rb == 3


def test_config_is_frozen():
    cfg = load_config("mnist_gauss_1", [])
    with pytest.raises(Exception):
        cfg.train.lr = 0.5


def _message(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg  # one line, so the CLI prints exactly one error line
    return msg


def test_unknown_file_lists_experiment_files():
    with pytest.raises(ConfigError) as e:
        load_config("no_such_experiment.yaml", [])
    msg = _message(e)
    assert "no_such_experiment.yaml" in msg
    for name in NAMES:
        assert name + ".yaml" in msg


@pytest.mark.parametrize("key,hint", [("train.lrr", "train.lr"),
                                      ("quantization.size_dic", "quantization.size_dict"),
                                      ("flags.arelb", "flags.arelbo")])
def test_unknown_key_names_key_and_close_match(key, hint):
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", [key, "1"])
    msg = _message(e)
    assert f"'{key}'" in msg
    assert f"did you mean '{hint}'" in msg


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", ["train.zzzzzz", "1"])
    msg = _message(e)
    for key in ("train.bs", "train.lr", "train.epoch_max"):
        assert key in msg


def test_unknown_section_is_an_unknown_key():
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", ["trian.lr", "1"])
    assert "'trian.lr'" in _message(e)
    # A section cannot be overwritten by a value either.
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", ["train", "1"])
    assert "'train'" in _message(e)


@pytest.mark.parametrize("key,value", [("train.epoch_max", "abc"), ("train.epoch_max", "1.5"),
                                       ("train.lr", "fast"), ("flags.bn", "1"),
                                       ("dataset.shape", "abc")])
def test_wrong_type_names_key_and_value(key, value):
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", [key, value])
    msg = _message(e)
    assert f"'{key}'" in msg and value in msg


def test_odd_override_count():
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", ["train.lr", "0.1", "train.epoch_max"])
    msg = _message(e)
    assert "'train.epoch_max'" in msg and "KEY VALUE" in msg


@pytest.mark.parametrize("key,value,allowed", [
    ("model.name", "FooVAE", ("GaussianSQVAE", "VmfSQVAE", "VQVAE")),
    ("model.param_var_q", "gaussian_9", ("gaussian_1", "gaussian_2", "gaussian_3", "gaussian_4",
                                         "vmf")),
    ("dataset.name", "ImageNet", ("MNIST", "FashionMNIST", "CIFAR10", "CelebA",
                                  "CelebAMask_HQ")),
    ("network.name", "unet", ("resnet", "resnet_label")),
    ("network.act_decoder", "relu", ("exp", "sigmoid", "tanh", "none")),
    ("quantization.init", "zeros", ("normal", "uniform")),
])
def test_unknown_choice_lists_allowed_values(key, value, allowed):
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", [key, value])
    msg = _message(e)
    assert f"'{key}'" in msg and value in msg
    for name in allowed:
        assert name in msg


@pytest.mark.parametrize("opts,key", [
    (["network.name", "resnet_label"], "network.name"),  # MNIST needs resnet
    (["dataset.shape", "(3, 28, 28)", "dataset.dim_x", "2352"], "dataset.shape"),
    (["dataset.dim_x", "100"], "dataset.dim_x"),
    (["model.name", "VmfSQVAE"], "model.name"),  # VmfSQVAE needs vmf + CelebAMask_HQ
    (["quantization.size_dict", "0"], "quantization.size_dict"),
    (["train.bs", "0"], "train.bs"),
])
def test_inconsistent_values_are_rejected(opts, key):
    with pytest.raises(ConfigError) as e:
        load_config("mnist_gauss_1", opts)
    assert f"'{key}'" in _message(e)


def test_yaml_syntax_error(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train:\n  lr: [0.1\n  bs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad), [])
    msg = _message(e)
    assert str(bad) in msg and "YAML" in msg and "line" in msg


def test_yaml_file_with_unknown_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  lr: 0.1\n  epoch_maxx: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), [])
    assert "did you mean 'train.epoch_max'" in _message(e)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        load_config(str(path), [])


@pytest.mark.parametrize("name", NAMES)
def test_yaml_round_trip(name, tmp_path):
    cfg = load_config(name, ["path", str(tmp_path / "runs"), "train.lr", "0.0003"])
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(cfg))
    again = load_config(str(path), [])
    assert again == cfg
    assert again.quantization.dim_code == cfg.quantization.dim_code
    if name == "celebamask_vmf":
        assert again.quantization.dim_code == 65  # 64 + 1, not 66 on the second load
    assert again.path == str(tmp_path / "runs")


def test_yaml_round_trip_keeps_path_over_env(monkeypatch, tmp_path):
    cfg = load_config("celebamask_vmf", ["path", str(tmp_path / "a")])
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(cfg))
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path / "b"))
    again = load_config(str(path), [])
    assert again == cfg


# ---------------------------------------------------------------------------------------------
# The command line. A fresh interpreter costs ~3.5 CPU-seconds of imports (torch, torchvision),
# so the real-process cases (every config error, plus one --summary) are started together once
# and share a fixture; the nine --summary outputs are also checked through main.run in-process.

BAD_CASES = {
    "unknown_file": ["-c", "no_such_experiment.yaml"],
    "unknown_key": ["-c", "mnist_gauss_1.yaml", "train.lrr", "0.1"],
    "odd_overrides": ["-c", "mnist_gauss_1.yaml", "train.lr"],
    "unknown_variant": ["-c", "mnist_gauss_1.yaml", "model.param_var_q", "gaussian_9"],
}
SUMMARY_IN_SUBPROCESS = "celebamask_vmf"
REAL_PROCESS_CASE = "unknown_file"  # the others call main.run in this process (no fresh imports)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    empty_data = tmp_path_factory.mktemp("empty_data")
    ckpt = tmp_path_factory.mktemp("ckpt")
    env = dict(os.environ, SQVAE_DATA=str(empty_data), SQVAE_CHECKPOINTS=str(ckpt),
               OMP_NUM_THREADS="1")
    cases = {REAL_PROCESS_CASE: BAD_CASES[REAL_PROCESS_CASE],
             "summary": ["-c", SUMMARY_IN_SUBPROCESS + ".yaml", "--summary"]}
    procs = {key: subprocess.Popen([sys.executable, "main.py", *argv], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, argv in cases.items()}
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[key] = (proc.returncode, out, err)
    assert not os.listdir(empty_data) and not os.listdir(ckpt)  # nothing is written
    return results


def _params_line(name):
    total, encoder, decoder = PARAMS[name]
    return f"params total={total} encoder={encoder} decoder={decoder}"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_cli_config_errors(cli_results, case, monkeypatch, tmp_path, capsys):
    if case == REAL_PROCESS_CASE:
        rc, out, err = cli_results[case]
    else:
        import main
        monkeypatch.setenv("SQVAE_DATA", str(tmp_path))
        monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path))
        capsys.readouterr()
        rc = main.run(BAD_CASES[case])
        out, err = capsys.readouterr()
        assert not os.listdir(tmp_path)  # nothing is written
    assert rc == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    # The line is the ConfigError's own one-line message.
    argv = BAD_CASES[case]
    with pytest.raises(ConfigError) as e:
        load_config(argv[1], argv[2:])
    assert lines[0] == f"error: {e.value}"


def test_cli_summary_subprocess(cli_results):
    rc, out, err = cli_results["summary"]
    assert rc == 0, err
    assert "Traceback" not in err
    assert out.splitlines()[-1] == _params_line(SUMMARY_IN_SUBPROCESS)


@pytest.mark.parametrize("name", NAMES)
def test_summary(name, monkeypatch, tmp_path, capsys):
    import main
    monkeypatch.setenv("SQVAE_DATA", str(tmp_path))  # an empty folder: no dataset is read
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path))
    assert main.run(["-c", name + ".yaml", "--summary"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == _params_line(name)
    # Everything before the counts is the resolved config, which reads back unchanged.
    printed = tmp_path / "printed.yaml"
    printed.write_text(out[:out.rindex("params total=")])
    assert load_config(str(printed), []) == load_config(name, [])
    assert os.listdir(tmp_path) == ["printed.yaml"]
