"""configs/registry.py, the one table of names, by what its names do.

Every dataset, model and quantizer variant it names is accepted by config validation and
builds a model that reconstructs an input of the dataset's shape; every combination a model
does not take is refused in one line; any other name is refused in one line that lists the
known ones. A new Gaussian variant is one function and its entry in
networks/quantizers.py:GAUSSIAN_VARIANCES plus its name in the registry (docs/code-map.md):
the toy variant below is added that way.
"""
import itertools

import pytest
import torch

import networks
from configs import ConfigError, config_from_mapping, registry
from data import sources
from data.loader import TO_MODEL
from networks import quantizers
from networks.nets import NETWORK_CHANNELS, NETWORK_REGISTRY, OUTPUT_ACTIVATIONS


def config(dataset, model, variant, /, **sections):
    """A small config (D = 4, K = 8, one ResBlock) for the combination, built the way
    load_config builds one; `sections` adds keys per section."""
    mapping = {"dataset": {"name": dataset},
               "network": {"name": registry.DATASETS[dataset].network, "num_rb": 1},
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


def reconstructs(cfg):
    """The model `cfg` describes, run on two inputs of dataset.shape: its output keeps the
    input's grid (and, for images, its channels), and the loss has a gradient."""
    torch.manual_seed(0)
    model = networks.build_model(cfg)
    shape = tuple(cfg.dataset.shape)
    x = (torch.randint(0, 3, (2, *shape)) if model.OUTPUTS == "labels"
         else torch.rand(2, *shape))
    x_hat, terms = model(x)
    terms["loss"].backward()
    assert tuple(x_hat.shape[2:]) == shape[1:]
    if model.OUTPUTS == "images":
        assert x_hat.shape[1] == shape[0]
    assert torch.isfinite(terms["loss"]) and model.codebook.grad is not None
    return model


def a_model_for(dataset):
    """The first model (and its first variant) that takes `dataset`."""
    items = registry.DATASETS[dataset].items
    name, spec = next((m, s) for m, s in registry.MODELS.items() if s.items == items)
    return name, (spec.variants or registry.VARIANTS)[0]


@pytest.mark.parametrize("name", list(registry.DATASETS))
def test_every_dataset_builds_a_model_for_its_shape_and_has_a_reader(name):
    cfg = config(name, *a_model_for(name))
    shape = registry.DATASETS[name].shape
    assert cfg.dataset.shape == shape and cfg.dataset.dim_x == shape[0] * shape[1] * shape[2]
    reconstructs(cfg)
    assert sources.source(name).name == name
    assert registry.DATASETS[name].items in TO_MODEL  # the loaders know how to hand them on


def test_no_reader_or_network_for_a_dataset_the_table_lacks():
    assert set(sources.discover()) == set(registry.DATASETS)
    sizes = {(spec.network, (side, side)) for spec in registry.DATASETS.values()
             for side in spec.sizes or spec.shape[1:2]}
    assert set(NETWORK_REGISTRY) == sizes


@pytest.mark.parametrize("name", [n for n, spec in registry.DATASETS.items() if spec.sizes])
def test_every_size_and_channels_of_a_sized_dataset_builds_a_model(name):
    spec = registry.DATASETS[name]
    assert spec.channels and set(spec.channels) <= set(NETWORK_CHANNELS[spec.network])
    for side, c in itertools.product(spec.sizes, spec.channels):
        cfg = config(name, *a_model_for(name), dataset={"image_size": side, "channels": c})
        assert cfg.dataset.shape == (c, side, side)
        reconstructs(cfg)
    # ImageFolder's values, by hand: a size without a network, and 4 channels, are refused.
    assert refusal(name, *a_model_for(name), dataset={"image_size": 48}) == (
        f"config key 'dataset.image_size' is 48; dataset {name} takes 64, 32 or 28 (the sizes "
        "with networks)")
    assert refusal(name, *a_model_for(name), dataset={"channels": 4}) == (
        f"config key 'dataset.channels' is 4; dataset {name} takes 3 or 1")


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
    assert set(networks.MODEL_REGISTRY) == set(registry.MODELS)
    for name, spec in registry.MODELS.items():
        assert networks.MODEL_REGISTRY[name].OUTPUTS == spec.items, name


def test_codebook_starts_and_activations_have_their_implementations():
    assert set(registry.CODEBOOK_INITS) == set(quantizers.CODEBOOK_INITS)
    assert set(registry.ACTIVATIONS) == set(OUTPUT_ACTIVATIONS)


def test_every_combination_builds_a_model_or_is_refused_in_one_line():
    built = set()
    for model, dataset, variant in itertools.product(registry.MODELS, registry.DATASETS,
                                                     registry.VARIANTS):
        try:
            cfg = config(dataset, model, variant)
        except ConfigError as e:
            assert "\n" not in str(e)
            assert str(e).startswith(f"config key 'model.name' {model} needs "), str(e)
            continue
        built.add((model, variant))
        built_model = reconstructs(cfg)
        # The variance head is there exactly when the quantizer reads it.
        assert (built_model.encoder.head_log_var is not None) == getattr(
            built_model.quantizer, "needs_log_var", False)
    # By hand (docs/model.md §1): the SQ-VAE takes every variant, the VQ-VAE variant I only.
    assert {v for m, v in built if m == "GaussianSQVAE"} == set(registry.VARIANTS)
    assert {v for m, v in built if m == "VQVAE"} == {"gaussian_1"}
    assert {v for m, v in built if m == "VmfSQVAE"} == {"vmf"}


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


@pytest.mark.parametrize("model, dataset, init, ema, allowed", [
    ("VQVAE", "MNIST", "uniform", True, True),
    ("VQVAE", "MNIST", "normal", False, True),
    ("GaussianSQVAE", "MNIST", "uniform", False, False),
    ("GaussianSQVAE", "MNIST", "normal", True, False),
    ("VmfSQVAE", "CelebAMask_HQ", "uniform", False, False),
])
def test_only_the_vqvae_takes_another_codebook_start_or_the_ema(model, dataset, init, ema,
                                                                allowed):
    args = (dataset, model, "vmf" if model == "VmfSQVAE" else "gaussian_1")
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


@pytest.mark.parametrize("key, value, known", [
    ("dataset", {"name": "ImageNet"}, registry.DATASETS),
    ("model", {"name": "FooVAE"}, registry.MODELS),
    ("model", {"param_var_q": "gaussian_9"}, registry.VARIANTS),
    ("network", {"name": "unet"}, registry.NETWORKS),
])
def test_an_unknown_name_is_refused_in_one_line_that_lists_the_known(key, value, known):
    message = refusal("MNIST", "GaussianSQVAE", "gaussian_1", **{key: value})
    (field, name), = value.items()
    assert message == (f"config key '{key}.{field}' is {name!r}; allowed values: "
                       + ", ".join(known))


# A toy variant, added as docs/code-map.md says: one function, its entry in
# GAUSSIAN_VARIANCES, and its name in the registry. Half the mean log-variance per position,
# with a head; or a fixed variance of 2 + exp(s), without one.
def _variance_toy(log_var, s):
    return torch.exp(0.5 * log_var.mean(dim=1, keepdim=True)) + torch.exp(s)


def _variance_toy_fixed(log_var, s):
    return 2.0 + torch.exp(s)


@pytest.mark.parametrize("name, variance", [
    ("toy", quantizers.Variance(_variance_toy, True, "toy")),
    ("toy_fixed", quantizers.Variance(_variance_toy_fixed, False, "toy fixed")),
])
def test_a_new_variant_is_one_function_and_its_entries(monkeypatch, name, variance):
    monkeypatch.setitem(quantizers.GAUSSIAN_VARIANCES, name, variance)
    monkeypatch.setattr(registry, "VARIANTS", (*registry.VARIANTS, name))
    cfg = config("MNIST", "GaussianSQVAE", name)
    model = reconstructs(cfg)
    assert (model.encoder.head_log_var is not None) is variance.reads_log_var
    assert model.quantizer.label == variance.label
    assert model.encoder.head_mean.block[1].weight.grad is not None
    z, log_var = model.run_encoder(torch.rand(2, 1, 28, 28))
    expected = variance.of(log_var, model.quantizer.log_param_q_scalar)
    assert torch.equal(model.quantizer.param_q(log_var), expected)
    # The other models still refuse it.
    assert refusal("MNIST", "VQVAE", name) == (
        f"config key 'model.name' VQVAE needs model.param_var_q gaussian_1, not {name}")
