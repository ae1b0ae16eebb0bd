"""configs/registry.py, the one table of names.

Every dataset, model and quantizer variant it names is accepted by config validation and has
its implementation (a reader, a network for its shape, a model class, a quantizer); the rules
it states are the ones load_config applies; any other name is refused in one line. The
expected values are written out here by hand (docs/model.md §1), not read from the table.
"""
import itertools

import pytest
import torch

import networks
from configs import ConfigError, config_from_mapping, registry
from data import sources
from data.loader import TO_MODEL
from networks.nets import NETWORK_CHANNELS, NETWORK_REGISTRY, OUTPUT_ACTIVATIONS
from networks.quantizers import CODEBOOK_INITS, GAUSSIAN_VARIANCES, GaussianQuantizer

# docs/model.md §1: dataset -> (shape, dim_x = C * H * W, network.name)
DATASETS = {
    "MNIST": ((1, 28, 28), 784, "resnet"),
    "FashionMNIST": ((1, 28, 28), 784, "resnet"),
    "CIFAR10": ((3, 32, 32), 3072, "resnet"),
    "CelebA": ((3, 64, 64), 12288, "resnet"),
    "CelebAMask_HQ": ((1, 64, 64), 4096, "resnet_label"),
    "ImageFolder": ((3, 64, 64), 12288, "resnet"),  # by default; see SIZED
}
IMAGES = ("MNIST", "FashionMNIST", "CIFAR10", "CelebA", "ImageFolder")
# Datasets of pictures the config sizes: dataset.image_size values, dataset.channels values.
SIZED = {"ImageFolder": ((64, 32, 28), (3, 1))}
VARIANTS = ("gaussian_1", "gaussian_2", "gaussian_3", "gaussian_4", "vmf")
# model -> (the datasets it takes, the variants it takes)
MODELS = {
    "GaussianSQVAE": (IMAGES, VARIANTS),
    "VmfSQVAE": (("CelebAMask_HQ",), ("vmf",)),
    "VQVAE": (IMAGES, ("gaussian_1",)),
}


def config(dataset, model, variant, /, **sections):
    """A small config (D = 4, K = 8, one ResBlock) for the combination, built the way
    load_config builds one; `sections` adds keys per section."""
    mapping = {"dataset": {"name": dataset},
               "network": {"name": DATASETS[dataset][2], "num_rb": 1},
               "model": {"name": model, "param_var_q": variant},
               "quantization": {"size_dict": 8, "dim_dict": 4}}
    for section, values in sections.items():
        mapping.setdefault(section, {}).update(values)
    return config_from_mapping(mapping)


def refusal(*args, **sections):
    with pytest.raises(ConfigError) as e:
        config(*args, **sections)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_the_table_holds_the_names_of_the_docs():
    assert tuple(registry.DATASETS) == tuple(DATASETS)
    assert tuple(registry.MODELS) == tuple(MODELS)
    assert tuple(registry.VARIANTS) == VARIANTS
    assert registry.NETWORKS == ("resnet", "resnet_label")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_is_accepted_with_its_shape_a_reader_and_a_network(name):
    shape, dim_x, network = DATASETS[name]
    model = next(m for m, (datasets, _) in MODELS.items() if name in datasets)
    cfg = config(name, model, MODELS[model][1][0])
    assert cfg.dataset.shape == shape and cfg.dataset.dim_x == dim_x
    assert cfg.network.name == network
    # A module declaring it, with the table's items and shape, and a way to hand its items
    # to the model.
    declared = sources.source(name)
    assert declared.name == name and declared.items == registry.DATASETS[name].items
    assert declared.items in TO_MODEL
    assert declared.shape == (None if name in SIZED else shape)
    # A network whose stem takes the shape: the decoder gives back the input's grid.
    assert (network, shape[1:]) in NETWORK_REGISTRY and shape[0] in NETWORK_CHANNELS[network]
    torch.manual_seed(0)
    built = networks.build_model(cfg).eval()
    x = (torch.zeros(2, *shape, dtype=torch.long) if built.OUTPUTS == "labels"
         else torch.rand(2, *shape))
    with torch.no_grad():
        x_hat, _ = built(x, "deterministic")
    assert tuple(x_hat.shape[2:]) == shape[1:]


def test_no_reader_or_network_for_a_dataset_the_table_lacks():
    assert set(sources.discover()) == set(DATASETS)
    sizes = {(network, shape[1:]) for shape, _, network in DATASETS.values()}
    sizes |= {(DATASETS[name][2], (side, side)) for name, (sides, _) in SIZED.items()
              for side in sides}
    assert set(NETWORK_REGISTRY) == sizes


@pytest.mark.parametrize("name", sorted(SIZED))
def test_every_size_and_channels_of_a_sized_dataset_builds_a_model(name):
    sides, channels = SIZED[name]
    assert registry.DATASETS[name].sizes == sides
    assert registry.DATASETS[name].channels == channels
    for side, c in itertools.product(sides, channels):
        cfg = config(name, "GaussianSQVAE", "gaussian_1",
                     dataset={"image_size": side, "channels": c})
        assert cfg.dataset.shape == (c, side, side) and cfg.dataset.dim_x == c * side * side
        built = networks.build_model(cfg).eval()
        with torch.no_grad():
            x_hat, _ = built(torch.rand(2, c, side, side), "deterministic")
        assert x_hat.shape == (2, c, side, side)
    message = refusal(name, "GaussianSQVAE", "gaussian_1", dataset={"image_size": 48})
    assert message == (f"config key 'dataset.image_size' is 48; dataset {name} takes 64, 32 or "
                       "28 (the sizes with networks)")
    message = refusal(name, "GaussianSQVAE", "gaussian_1", dataset={"channels": 4})
    assert message == f"config key 'dataset.channels' is 4; dataset {name} takes 3 or 1"


def test_a_fixed_shape_is_refused_another_size_or_channels():
    assert config("MNIST", "GaussianSQVAE", "gaussian_1", dataset={"image_size": 28}
                  ).dataset.shape == (1, 28, 28)
    assert refusal("MNIST", "GaussianSQVAE", "gaussian_1", dataset={"image_size": 64}) == (
        "config key 'dataset.image_size' is 64 but dataset MNIST has size 28; remove the key, "
        "it follows dataset.name")
    assert refusal("CIFAR10", "GaussianSQVAE", "gaussian_1", dataset={"channels": 1}) == (
        "config key 'dataset.channels' is 1 but dataset CIFAR10 has channels 3; remove the "
        "key, it follows dataset.name")


def test_every_model_has_its_class_reconstructing_what_the_table_says():
    assert set(networks.MODEL_REGISTRY) == set(MODELS)
    for name, spec in registry.MODELS.items():
        assert networks.MODEL_REGISTRY[name].OUTPUTS == spec.items, name


def test_the_variants_are_the_quantizers_and_their_variance_heads():
    assert set(GAUSSIAN_VARIANCES) == {"gaussian_1", "gaussian_2", "gaussian_3", "gaussian_4"}
    heads = {"gaussian_1": False, "gaussian_2": True, "gaussian_3": True, "gaussian_4": True,
             "vmf": False}
    assert registry.VARIANTS == heads
    for variant in GAUSSIAN_VARIANCES:
        assert GaussianQuantizer(4, 8, variant).needs_log_var is heads[variant], variant


def test_codebook_starts_and_activations_have_their_implementations():
    assert set(registry.CODEBOOK_INITS) == set(CODEBOOK_INITS) == {"normal", "uniform"}
    assert set(registry.ACTIVATIONS) == set(OUTPUT_ACTIVATIONS)


def test_every_combination_is_accepted_exactly_when_the_model_takes_it():
    for model, dataset, variant in itertools.product(MODELS, DATASETS, VARIANTS):
        datasets, variants = MODELS[model]
        if dataset in datasets and variant in variants:
            cfg = config(dataset, model, variant)
            assert cfg.quantization.dim_code == 4 + (model == "VmfSQVAE")
            assert cfg.flags.var_q is (variant in ("gaussian_2", "gaussian_3", "gaussian_4"))
        else:
            assert refusal(dataset, model, variant).startswith(
                f"config key 'model.name' {model} needs "), (model, dataset, variant)


@pytest.mark.parametrize("combination, message", [
    (("CelebAMask_HQ", "VQVAE", "gaussian_1"),
     "config key 'model.name' VQVAE needs dataset.name one of MNIST, FashionMNIST, CIFAR10, "
     "CelebA, ImageFolder, not CelebAMask_HQ"),
    (("CelebAMask_HQ", "GaussianSQVAE", "vmf"),
     "config key 'model.name' GaussianSQVAE needs dataset.name one of MNIST, FashionMNIST, "
     "CIFAR10, CelebA, ImageFolder, not CelebAMask_HQ"),
    (("MNIST", "VmfSQVAE", "vmf"),
     "config key 'model.name' VmfSQVAE needs dataset.name CelebAMask_HQ, not MNIST"),
    (("MNIST", "VQVAE", "gaussian_3"),
     "config key 'model.name' VQVAE needs model.param_var_q gaussian_1, not gaussian_3"),
])
def test_a_refused_combination_names_what_the_model_needs(combination, message):
    assert refusal(*combination) == message


@pytest.mark.parametrize("model, init, ema, allowed", [
    ("VQVAE", "uniform", True, True),
    ("VQVAE", "normal", False, True),
    ("GaussianSQVAE", "uniform", False, False),
    ("GaussianSQVAE", "normal", True, False),
    ("VmfSQVAE", "uniform", False, False),
])
def test_only_the_vqvae_takes_another_codebook_start_or_the_ema(model, init, ema, allowed):
    dataset = MODELS[model][0][0]
    args = (dataset, model, MODELS[model][1][0])
    quantization = {"init": init, "ema": ema}
    if allowed:
        assert config(*args, quantization=quantization).quantization.init == init
    elif init != "normal":
        assert refusal(*args, quantization=quantization) == (
            f"config key 'quantization.init' uniform needs model.name VQVAE (model.name "
            f"{model} takes normal)")
    else:
        assert refusal(*args, quantization=quantization) == (
            "config key 'quantization.ema' True needs model.name VQVAE")


@pytest.mark.parametrize("key, value, allowed", [
    ("dataset", {"name": "ImageNet"}, DATASETS),
    ("model", {"name": "FooVAE"}, MODELS),
    ("model", {"param_var_q": "gaussian_9"}, VARIANTS),
    ("network", {"name": "unet"}, ("resnet", "resnet_label")),
])
def test_an_unknown_name_is_refused_in_one_line_that_lists_the_known(key, value, allowed):
    message = refusal("MNIST", "GaussianSQVAE", "gaussian_1", **{key: value})
    (field, name), = value.items()
    assert message == (f"config key '{key}.{field}' is {name!r}; allowed values: "
                       + ", ".join(allowed))
