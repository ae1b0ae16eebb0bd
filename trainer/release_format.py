"""Run folders of the authors' release (github.com/sony/sqvae, vision/), read as data: the one
module that knows their format (configs.json, a ``module.``-prefixed state dict under other
names, a (1,)-shaped ``log_kappa_inv``, ``test.bs`` = ``train.bs``). README, "Coming from the
authors' code"; ``python -m trainer.release import`` makes one a run of ours."""
import json
import os
import re

from configs import ConfigError, brief, config_from_mapping

from .checkpoints import BEST, RunError, read_checkpoint

CONFIG_FILE = "configs.json"
OUR_CONFIG = "config.yaml"  # runs.CONFIG_FILE: a folder with one is ours
# Release key prefix (a regex) -> ours, tried in order; the first match renames.
KEY_RENAMES = (
    (r"encoder\.conv\.0\.0\.", "encoder.stem.0."),  # CelebA nests its first conv
    (r"encoder\.conv\.", "encoder.stem."),
    (r"encoder\.res_m\.", "encoder.head_mean."),
    (r"encoder\.res_v\.", "encoder.head_log_var."),
    (r"decoder\.convt\.", "decoder.head."),
    # The quantizer's tensors, in its layer here.
    (r"(codebook|log_param_q_scalar|ema_count|ema_total)$", r"quantizer.\1"),
)
# configs.json keys that carry over, as (section, keys); the others are the release's own
# bookkeeping (paths, workers, the seed, save/print switches) or derived here.
CARRIED = {
    "dataset": ("name", "shape", "dim_x"),
    "model": ("name", "param_var_q", "log_param_q_init", "log_kappa_inv"),
    "network": ("name", "num_rb", "num_class", "act_decoder"),
    "quantization": ("size_dict", "dim_dict", "temperature"),
    "train": ("bs", "lr", "epoch_max"),
    "flags": ("arelbo", "decay", "bn"),
}


def is_release_run(run_dir):
    """A folder of the authors' release: its configs.json, none of our config."""
    return (os.path.isfile(os.path.join(run_dir, CONFIG_FILE))
            and not os.path.isfile(os.path.join(run_dir, OUR_CONFIG)))


def read_release_json(run_dir):
    """A release folder's configs.json as it is (with dataset and model sections)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path}: {type(e).__name__}; is it a run folder of the "
                       "authors' release?") from None
    except RecursionError:  # the JSON parser recurses once per level of nesting
        raise RunError(f"{path} is nested too deeply to be the config of a release run; "
                       "is it a run folder of the authors' release?") from None
    if not isinstance(saved, dict) or "dataset" not in saved or "model" not in saved:
        raise RunError(f"{path} is not the config of a release run (no dataset or model)")
    return saved


def read_release_config(run_dir, opts=None):
    """Our config for a release run folder, from its configs.json."""
    saved, path, mapping = read_release_json(run_dir), os.path.join(run_dir, CONFIG_FILE), {}
    for section, keys in CARRIED.items():
        values = {} if saved.get(section) is None else saved[section]
        if not isinstance(values, dict):
            raise RunError(f"{path}: its {section} is {brief(values)}, not a section of "
                           "settings; is it a run folder of the authors' release?")
        mapping[section] = {k: values[k] for k in keys if k in values}
    mapping["test"] = {"bs": mapping["train"].get("bs", 32)}
    relative = saved.get("path_specific")
    # Kept only below `path`: an import never writes where a downloaded file points.
    if (isinstance(relative, str) and relative.strip("/") and not os.path.isabs(relative)
            and os.path.normpath(relative).split(os.sep)[0] != os.pardir):
        mapping["path_specific"] = relative
    try:
        return config_from_mapping(mapping, opts)
    except ConfigError as e:
        raise RunError(f"{path}: {e}") from None


def our_key(key):
    """The name of a release state-dict key in this repository's models."""
    key = key.removeprefix("module.")
    for pattern, replacement in KEY_RENAMES:
        renamed, count = re.subn("^" + pattern, replacement, key)
        if count:
            return renamed
    return key


def convert_state_dict(state):
    """A release state dict (with or without DataParallel's prefix) under our names."""
    import torch
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError("not a state dict of tensors")
    out = {our_key(k): v for k, v in state.items()}
    if "log_kappa_inv" in out:
        out["log_kappa_inv"] = out["log_kappa_inv"].reshape(())
    return out


def load_release_weights(run_dir):
    """The weights of a release's best.pt under our names."""
    path = os.path.join(run_dir, BEST)
    state = read_checkpoint(path)
    try:
        return convert_state_dict(state)
    except RunError as e:
        raise RunError(f"checkpoint {path}: {e}; is it a checkpoint of the authors' "
                       "release?") from None
