"""``load_config(name_or_path, opts)``, the one way a config is made: defaults (``defaults.py``),
an experiment file, ``KEY VALUE`` overrides, validation (``registry.py``), derivation; frozen."""
import ast
import contextlib
import difflib
import functools
import math
import os
import reprlib

import yaml
from yacs.config import CfgNode

from . import registry
from .defaults import get_defaults

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(CONFIG_DIR)
REPO_TOKEN = "{repo}"  # at the start of `path` or `path_dataset`: REPO_DIR
SAMPLE_DATA = os.path.join(REPO_DIR, "tests", "data")


class ConfigError(ValueError):
    """A config problem the user can fix; the message is one line naming the fix."""


def experiment_files():
    return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def _flatten(mapping, prefix=""):
    """(dotted key, value) of every leaf of a nested mapping (a CfgNode is one)."""
    for key, value in mapping.items():
        yield from (_flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
                    else [(f"{prefix}{key}", value)])


def _set(cfg, known, key, value):
    """cfg's dotted `key`, one of `known` (key: default), set to `value` as the type of its
    default (an int for a float, a list of ints for a tuple)."""
    parent, _, leaf = key.rpartition(".")
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint}; allowed keys here: "
                          + ", ".join(k for k in known if k.rpartition(".")[0] == parent))
    default = known[key]
    if isinstance(value, str) and not isinstance(default, str):
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(value)
    kind = type(default)
    if (kind, type(value)) in ((float, int), (tuple, list)):
        value = kind(value)
    if type(value) is not kind or (kind is tuple and not all(isinstance(v, int) for v in value)):
        raise ConfigError(f"config key '{key}' needs a {kind.__name__} like {default!r}, "
                          f"got {brief(value)}")
    (get_key(cfg, parent) if parent else cfg)[leaf] = value


class YamlAliasError(yaml.composer.ComposerError):
    """A YAML alias (``*name``), refused: a few nested ones can outgrow memory."""


class _PlainLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data, no Python objects), aliases refused."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise YamlAliasError(None, None, "aliases (*name) are not accepted; write the "
                                 "value out", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_plain_yaml(stream):
    """A YAML document (str or file) as yaml.safe_load reads it, aliases refused."""
    return yaml.load(stream, Loader=_PlainLoader)


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 2, 40, 40, 40
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 4


def brief(value, limit=80):
    """repr(value) cut to `limit` characters, without building the whole repr."""
    try:
        text = _BRIEF.repr(value)
    except ValueError:  # an int beyond the digits Python converts to text
        text = f"<{type(value).__name__} of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def get_key(cfg, key):
    """The value at a dotted key, e.g. get_key(cfg, "train.lr")."""
    return functools.reduce(lambda node, part: node[part], key.split("."), cfg)


DERIVED_KEYS = {  # derived (a file's value dropped, an override refused): what to set instead
    "path_checkpoint": "it is path/path_specific: set path or path_specific instead",
    "quantization.dim_code": "it is quantization.dim_dict (+ 1 for VmfSQVAE): set that",
    "flags.var_q": "it follows model.param_var_q: set that"}  # held by older run folders
BOUNDS = (  # numeric keys by the lowest value each accepts, and whether it accepts that one
    ((0, True), ("nworker", "train.ckpt_every_steps", "train.bs_per_rank", "prior.layers")),
    ((1, True), ("quantization.size_dict", "network.num_rb", "network.num_class", "train.bs",
                 "train.epoch_max", "test.bs", "log.every_steps", "prior.channels", "prior.bs",
                 "prior.epoch_max", "prior.patience")),
    ((2, True), ("quantization.dim_dict",)),
    ((0.0, True), ("quantization.temperature.decay", "quantization.temperature.min", "model.beta")),
    ((0.0, False), ("quantization.temperature.init", "quantization.ema_eps", "train.lr",
                    "prior.lr", "prior.temperature")))


def _one_of(values, lead="one of ", last=", "):
    """A value alone as it is; else "one of a, b, c", or with ("", " or ") "a, b or c"."""
    return values[0] if len(values) == 1 else lead + ", ".join(values[:-1]) + last + values[-1]


def _check_dataset(cfg, dataset):
    """network.name fits dataset.name; dataset.shape and dim_x derived (stated: only as such);
    dataset.channels and image_size: 0 for the dataset's own, else one it takes (sizes)."""
    name = cfg.dataset.name
    if cfg.network.name != dataset.network:
        raise ConfigError(f"config key 'network.name' is {cfg.network.name!r} but dataset {name} "
                          f"needs {dataset.network!r}")
    for key, allowed in (("channels", dataset.channels), ("image_size", dataset.sizes)):
        if allowed and cfg.dataset[key] not in (0, *allowed):
            raise ConfigError(f"config key 'dataset.{key}' is {cfg.dataset[key]}; dataset {name} "
                              f"takes {_one_of([str(v) for v in allowed], '', ' or ')}"
                              + (" (the sizes with networks)" if key == "image_size" else ""))
    channels, size, _ = dataset.shape
    size = cfg.dataset.image_size or size
    shape = (cfg.dataset.channels or channels, size, size) if dataset.sizes else dataset.shape
    follows = "dataset.channels and dataset.image_size" if dataset.sizes else "dataset.name"
    for key, own in zip(("channels", "image_size", "shape", "dim_x"),
                        (*shape[:2], shape, math.prod(shape))):
        if (written := cfg.dataset[key]) and written != own:
            note = f" (C * H * W of {shape})" if key == "dim_x" else ""
            raise ConfigError(f"config key 'dataset.{key}' is {written} but dataset {name} has "
                              f"{key.removeprefix('image_')} {own}{note}; remove the key, it "
                              f"follows {follows}")
        cfg.dataset[key] = own


def _check_model(cfg, model):
    name = cfg.model.name
    fitting = [d for d, spec in registry.DATASETS.items() if spec.items == model.items]
    for key, taken in (("model.param_var_q", model.variants or registry.VARIANTS),
                       ("dataset.name", fitting)):
        if get_key(cfg, key) not in taken:
            raise ConfigError(f"config key 'model.name' {name} needs {key} {_one_of(taken)}, "
                              f"not {get_key(cfg, key)}")
    init = cfg.quantization.init
    if init not in model.codebook_inits:
        taking = _one_of([m for m, spec in registry.MODELS.items() if init in spec.codebook_inits])
        raise ConfigError(f"config key 'quantization.init' {init} needs model.name {taking} "
                          f"(model.name {name} takes {_one_of(model.codebook_inits)})")
    if cfg.quantization.ema and not model.ema:
        # The SQ-VAE's codebook is learned by its loss: ignoring the flag would mislabel a run.
        taking = [m for m, spec in registry.MODELS.items() if spec.ema]
        raise ConfigError(f"config key 'quantization.ema' True needs model.name {_one_of(taking)}")


def _validate_and_derive(cfg):
    for key, allowed in (("dataset.name", registry.DATASETS), ("model.name", registry.MODELS),
                         ("model.param_var_q", registry.VARIANTS),
                         ("network.name", registry.NETWORKS),
                         ("network.act_decoder", registry.ACTIVATIONS),
                         ("quantization.init", registry.CODEBOOK_INITS)):
        if get_key(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}' is {brief(get_key(cfg, key))}; allowed "
                              "values: " + ", ".join(map(str, allowed)))
    model = registry.MODELS[cfg.model.name]
    _check_dataset(cfg, registry.DATASETS[cfg.dataset.name])
    _check_model(cfg, model)
    if not 0.0 <= cfg.quantization.ema_decay < 1.0:
        raise ConfigError("config key 'quantization.ema_decay' must be in [0, 1), got "
                          f"{cfg.quantization.ema_decay}")
    for (bound, inclusive), key in ((limit, key) for limit, keys in BOUNDS for key in keys):
        value = get_key(cfg, key)
        if value < bound or (value == bound and not inclusive):
            need = f"at least {bound}" if inclusive else f"greater than {bound}"
            raise ConfigError(f"config key '{key}' must be {need}, got {value}")
    if cfg.prior.kernel < 3 or cfg.prior.kernel % 2 == 0:
        raise ConfigError("config key 'prior.kernel' must be an odd number at least 3, got "
                          f"{cfg.prior.kernel}")
    for key in ("path", "path_dataset"):  # absolute: a run folder's config works from any folder
        path = cfg[key]
        if path == REPO_TOKEN or path.startswith(REPO_TOKEN + "/"):
            path = REPO_DIR + path[len(REPO_TOKEN):]
        cfg[key] = os.path.abspath(os.path.expanduser(path))
    cfg.quantization.dim_code = cfg.quantization.dim_dict + model.extra_code_dim
    cfg.path_checkpoint = os.path.join(cfg.path, cfg.path_specific)


def is_sample_data(cfg):
    """Whether cfg trains on the sample in tests/data (a first run)."""
    return os.path.normpath(cfg.path_dataset) == os.path.normpath(SAMPLE_DATA)


def parse_overrides(opts):
    """Pair up trailing command-line overrides ``KEY VALUE KEY VALUE ...``."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"overrides come in KEY VALUE pairs, but '{opts[-1]}' has no value "
                          "(e.g. train.epoch_max 1 path /tmp/runs)")
    return list(zip(opts[0::2], opts[1::2]))


def config_from_mapping(mapping, opts=None):
    """Defaults + a nested mapping (an experiment file's content) + overrides, frozen."""
    cfg = get_defaults()
    known = dict(_flatten(cfg))  # every key and its default
    for key, value in _flatten(mapping):
        if key not in DERIVED_KEYS:  # recomputed anyway
            _set(cfg, known, key, value)
    for key, value in parse_overrides(opts):
        if key in DERIVED_KEYS:
            raise ConfigError(f"config key '{key}' is derived and cannot be set; "
                              + DERIVED_KEYS[key])
        _set(cfg, known, key, value)
    _validate_and_derive(cfg)
    cfg.freeze()
    return cfg


def load_config(name_or_path, opts=None):
    """Defaults + experiment file (any YAML path, or a shipped name: "mnist_gauss_1[.yaml]") +
    overrides, validated, derived and frozen."""
    shipped = os.path.join(CONFIG_DIR, name_or_path)  # name_or_path itself if absolute
    path = next((p for p in (name_or_path, shipped, shipped + ".yaml") if os.path.isfile(p)), None)
    if path is None:
        raise ConfigError(f"config file '{name_or_path}' not found; use a path or one of: "
                          + ", ".join(experiment_files()))
    try:
        with open(path) as f:
            data = load_plain_yaml(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        what = "YAML alias" if isinstance(e, YamlAliasError) else "YAML syntax error"
        raise ConfigError(f"{path}: {what}{where}: {problem}; fix the file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except (ValueError, OverflowError) as e:  # e.g. an int of too many digits, a bad date
        raise ConfigError(f"{path}: not readable as a config ({brief(str(e), 120)}); fix "
                          "the file") from None
    except RecursionError:  # the YAML parser recurses once per level
        raise ConfigError(f"{path}: nested too deeply to be a config (the settings nest at "
                          "most three levels); fix the file") from None
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return config_from_mapping(data or {}, opts)


def config_to_yaml(cfg):
    """The resolved config as YAML text that ``load_config`` reads back."""
    def plain(node):
        if isinstance(node, CfgNode):
            return {k: plain(v) for k, v in node.items()}
        return str(node) if isinstance(node, tuple) else node  # tuples yacs-style: "(1, 28)"
    return yaml.safe_dump(plain(cfg), sort_keys=False)
