"""Run folders: their config, checkpoints, metrics file and writer lock.

A run folder is ``<path>/<path_specific>/<network.name>_seed<seed>_<MMDD_HHMM>[_N]``.
It is claimed with ``os.mkdir`` (atomic: two runs started in the same minute get
two folders) and holds ``config.yaml``, ``best.pt``, ``current.pt``,
``metrics.jsonl`` and reconstruction grids; for a dataset whose files are chosen when the
run starts (a folder of pictures), ``dataset_files.json``, the files each split read, which
``-ts`` and ``--resume`` read again (``read_dataset_files``).

* Every file but ``metrics.jsonl`` is written through ``util.io`` (temporary file, then
  rename). ``metrics.jsonl`` is append-only: every writer appends whole lines, so nothing
  ever rewrites or truncates a record (``append_metrics``, ``read_metrics``).
* One process at a time trains into a folder: ``writer_lock`` holds an OS lock on
  ``.writer.lock`` for the run's lifetime, which the kernel releases however the process
  ends. Evaluations (``-ts``) only read, and append their lines without it.
* Checkpoints are plain dicts of tensors and numbers, loaded with
  ``torch.load(weights_only=True)`` and checked for the keys their reader needs.
* A folder where a name the tool writes is a symbolic link is refused before anything is
  written (``check_links``): run folders come from other people, and a planted link would
  make a write land outside the folder.
"""
import collections
import json
import os
import pickle
import sys
import time
import warnings
import zipfile

from configs import ConfigError, config_to_yaml, get_key, load_config
from util.io import (JsonlError, append_jsonl, atomic_save, atomic_write_text, read_jsonl,
                     refuse_links, remove_stale_temps)
from util.lock import FileLock, LockHeld

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DATASET_FILES = "dataset_files.json"
LOCK_FILE = ".writer.lock"
BEST, CURRENT = "best.pt", "current.pt"
TENSORBOARD = "tensorboard"
# Every name any command writes in a run folder (fnmatch patterns): checkpoints and the
# prior's, images, codes files, metrics.jsonl and the locks. None of them may be a link.
WRITTEN_NAMES = (CONFIG_FILE, DATASET_FILES, METRICS_FILE, f".{METRICS_FILE}.lock", LOCK_FILE,
                 TENSORBOARD, "*.pt", "*.png", "*.npz")
# The files only a holder of the writer lock writes, whose temporary files a killed writer
# may have left (no one else can be writing them while we hold the lock).
LOCKED_WRITES = (CONFIG_FILE, DATASET_FILES, BEST, CURRENT, "prior.pt", "prior_current.pt",
                 "reconstructions_best.png", "reconstructions_current.png")


class RunError(ValueError):
    """A run folder or checkpoint problem the user can fix; one line."""


def write_config(run_dir, cfg):
    atomic_write_text(os.path.join(run_dir, CONFIG_FILE), config_to_yaml(cfg))


def check_links(run_dir):
    """Refuse (util.io.UnsafeLink, one line naming it) a run folder in which a name the tool
    writes, or anything in its tensorboard/ folder, is a symbolic link. Call it before the
    first write: the writer lock is a write too."""
    refuse_links(run_dir, WRITTEN_NAMES, subfolders=(TENSORBOARD,))


def writer_lock(run_dir):
    """Hold the run folder's writer lock (released when the process ends, however it ends),
    or a RunError naming the process that holds it. Temporary files left by a writer killed
    mid-write are removed once the lock is ours."""
    try:
        lock = FileLock(os.path.join(run_dir, LOCK_FILE), blocking=False).acquire()
    except LockHeld as e:
        raise RunError(f"{run_dir} is being written by process {e.pid or '(unknown)'} (a "
                       "training or --resume); wait for it to end or stop it") from None
    try:
        remove_stale_temps(run_dir, LOCKED_WRITES)
    except BaseException:
        lock.release()
        raise
    return lock


def create_run_dir(cfg, seed, now=None, files=None):
    """Claim a fresh run folder, lock it for writing and write the resolved config into it
    (and `files`, the files each split reads, where the dataset says: see
    write_dataset_files); returns (path, lock)."""
    root = cfg.path_checkpoint
    os.makedirs(root, exist_ok=True)
    stamp = time.strftime("%m%d_%H%M", time.localtime(now))
    base = f"{cfg.network.name}_seed{seed}_{stamp}"
    for n in range(10_000):
        path = os.path.join(root, base if n == 0 else f"{base}_{n}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        lock = writer_lock(path)
        write_config(path, cfg)
        if files:
            write_dataset_files(path, cfg, files)
        return path, lock
    raise RunError(f"too many runs named {base}* in {root}")


def write_dataset_files(run_dir, cfg, files):
    """dataset_files.json: {split: {"files": [names], "skipped": [names]}} (relative to
    path_dataset) from the loaders of a dataset whose files are chosen at run time
    (data.recorded_files), so that the run is evaluated and resumed on the same files."""
    record = {"dataset": cfg.dataset.name, "path_dataset": cfg.path_dataset, "splits": files}
    atomic_write_text(os.path.join(run_dir, DATASET_FILES), json.dumps(record, indent=1) + "\n")


def read_dataset_files(run_dir):
    """The files each split of the run read ({split: record}, what data.build_loaders takes
    as `recorded`), or None where the run recorded none (its dataset's files are fixed)."""
    path = os.path.join(run_dir, DATASET_FILES)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({type(e).__name__}); it lists the files of "
                       "the run's splits: restore it from a copy of the run folder") from None
    splits = record.get("splits") if isinstance(record, dict) else None
    if not isinstance(splits, dict) or not all(
            isinstance(r, dict) and all(isinstance(r.get(k, []), list) and
                                        all(isinstance(n, str) for n in r.get(k, []))
                                        for k in ("files", "skipped"))
            for r in splits.values()):
        raise RunError(f"{path} is not a record of this tool (expected splits of file "
                       "names); restore it from a copy of the run folder")
    return splits


def read_metrics(run_dir):
    """The records of the run's metrics.jsonl; a torn last line is skipped with a warning, a
    malformed line elsewhere is a RunError (raised before any work, by callers that read
    first)."""
    path = os.path.join(run_dir, METRICS_FILE)

    def warn(text):
        # Once per file and process: a command may read the same file twice (compare's
        # --curves and its table).
        if os.path.abspath(path) not in _WARNED:
            _WARNED.add(os.path.abspath(path))
            print(text, file=sys.stderr)
    try:
        return read_jsonl(path, warn=warn)
    except JsonlError as e:
        raise RunError(str(e)) from None


_WARNED = set()  # metrics files whose torn last line was reported


def append_metrics(run_dir, records):
    append_jsonl(os.path.join(run_dir, METRICS_FILE), records)


def final_test_recorded(records, last_epoch):
    """Whether the training's own test (a "test" record without "source", appended after
    the last epoch's records) follows the "val" record of `last_epoch` in `records`: then
    a run trained to `last_epoch` is finished, and testing it again would record it twice."""
    after_last_val = False
    for record in records:
        if record.get("split") == "val" and record.get("epoch") == last_epoch:
            after_last_val = True
        elif after_last_val and record.get("split") == "test" and "source" not in record:
            return True
    return False


def resolve_run_dir(cfg, name, flag="-ts"):
    """A run folder from a name under path/path_specific, or from a path."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(cfg.path_checkpoint, name), name]
    for path in candidates:
        if os.path.isdir(path):
            return os.path.abspath(path)
    raise RunError(f"{flag} {name}: no such run folder (looked in {cfg.path_checkpoint}); "
                   "give a folder name from there or a path")


def load_run_config(run_dir, opts=None):
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} holds no {CONFIG_FILE}: not a run folder of this tool")
    try:
        return load_config(path, opts)
    except ConfigError as e:
        # Errors about the file itself already name it.
        raise RunError(str(e) if path in str(e) else f"{path}: {e}") from None


# Keys that tell experiment files apart; a resume under another file is refused. (Sizes such
# as num_rb may have been overridden at the start and live in the run's own config; so may
# path_specific, which says where the folder went, not what was trained.)
IDENTITY_KEYS = ("dataset.name", "model.name", "model.param_var_q", "network.name")


def check_same_experiment(run_cfg, cfg, run_dir, config_name):
    different = [k for k in IDENTITY_KEYS if get_key(run_cfg, k) != get_key(cfg, k)]
    if different:
        k = different[0]
        raise RunError(
            f"--resume {run_dir}: that run was trained with a different experiment "
            f"({k} = {get_key(run_cfg, k)!r}, but {config_name} has {get_key(cfg, k)!r}); "
            "pass the experiment file the run was started with")


def resume_launch(state, seed, limit_batches):
    """The run's own seed and --limit-batches; explicit flags must agree with them, since
    either would change the data order or the epoch length of an exact resume."""
    launch = state.get("launch", {"seed": 0, "limit_batches": None})
    if seed is not None and seed != launch["seed"]:
        raise RunError(f"--resume: this run was started with --seed {launch['seed']}; "
                       "drop --seed (a resume always uses the run's own seed)")
    if limit_batches is not None and limit_batches != launch["limit_batches"]:
        was = launch["limit_batches"]
        raise RunError(f"--resume: this run was started with "
                       f"{f'--limit-batches {was}' if was else 'full epochs'}; drop "
                       "--limit-batches (a resume keeps the run's epoch length)")
    return launch["seed"], launch["limit_batches"]


# torch is imported where a checkpoint is written or read, not with this module: the
# companion commands (trainer.compare, trainer.release) answer --help without it.

def save_checkpoint(path, state):
    import torch
    atomic_save(path, lambda buffer: torch.save(state, buffer))


def _other(path):
    folder, name = os.path.split(path)
    other = os.path.join(folder, CURRENT if name == BEST else BEST)
    return other if name in (BEST, CURRENT) else None


def _try_load(path):
    import torch
    try:
        with warnings.catch_warnings():
            # torch warns about a raw pickle's protocol before refusing it; the one-line
            # error below says all there is to say.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            return None, ("holds pickled Python objects, which are refused because loading "
                          "them could run code; re-save it with this tool")
        return None, "is corrupt (unreadable pickle data)"
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            return None, "does not exist"
        return None, "is truncated or corrupt"


def read_checkpoint(path):
    """The object a checkpoint file holds (plain data only), or a RunError that names the
    file and says whether the run's other checkpoint can be used instead."""
    if not os.path.isfile(path):
        raise RunError(f"{path} does not exist: the run holds no checkpoint "
                       "(was it started with --save, and did it finish an epoch?)")
    state, problem = _try_load(path)
    if state is None:
        other = _other(path)
        if other and os.path.isfile(other) and _try_load(other)[0] is not None:
            hint = f"; {os.path.basename(other)} in the same folder loads fine"
        elif other:
            hint = f"; {os.path.basename(other)} is not usable either"
        else:
            hint = ""
        raise RunError(f"checkpoint {path} {problem}{hint}")
    return state


# What each checkpoint must hold for its reader: key -> accepted types.
NUMBER = (int, float)
CHECKPOINT_KEYS = {
    BEST: {"model": dict, "epoch": (int, type(None))},
    CURRENT: {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "batch": int,
              "step": int, "best_loss": NUMBER, "best_epoch": int, "history": list,
              "train_meter": dict, "interval_meter": dict, "interval_codes": dict,
              "train_seconds": NUMBER, "rng": dict},
}


# Entries that hold a module's state dict (tensors only).
STATE_DICT_KEYS = ("model", "prior")


def load_checkpoint(path, needed=None):
    """A checkpoint of this tool, checked for the keys (and their types) that its reader
    needs (`needed`, key -> accepted types; by default CHECKPOINT_KEYS for best.pt and
    current.pt): a file that loads but lacks one is a one-line RunError, not a KeyError
    later."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise RunError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint "
                       "of this tool")
    needed = needed or CHECKPOINT_KEYS.get(os.path.basename(path), {"model": dict})
    missing = [k for k in needed if k not in state]
    wrong = [k for k, kinds in needed.items() if k in state and not isinstance(state[k], kinds)]
    if missing or wrong:
        what = (f"lacks {', '.join(missing)}" if missing else
                f"has {', '.join(f'{k} of type {type(state[k]).__name__}' for k in wrong)}")
        raise RunError(f"checkpoint {path} {what}: not a complete checkpoint of this tool"
                       + ("; best.pt in the same folder can still be evaluated with -ts"
                          if os.path.basename(path) == CURRENT else ""))
    import torch
    for key in STATE_DICT_KEYS:
        if key in needed and not all(isinstance(v, torch.Tensor) for v in state[key].values()):
            raise RunError(f"checkpoint {path}: its {key} entry is not a state dict of tensors")
    return state


# Which config keys set the shape of which parameters (by name prefix).
SHAPE_KEYS = (
    ("quantizer.codebook", "quantization.size_dict, quantization.dim_dict"),
    ("encoder.head_log_var", "model.param_var_q"),
    ("log_var_x", "flags.arelbo"),
    ("log_kappa_inv", "model.name"),
    ("quantizer.ema_", "quantization.ema, quantization.size_dict, quantization.dim_dict"),
    ("encoder.res", "network.num_rb, quantization.dim_dict"),
    ("decoder.res", "network.num_rb, quantization.dim_dict"),
    ("", "quantization.dim_dict, flags.bn, dataset.name"),
)


def load_model_weights(model, state_dict, path):
    """load_state_dict with a one-line message naming mismatched parameters and the config
    keys that set them. Names from before the quantizer became a layer are mapped first."""
    from networks import upgrade_state_dict
    state_dict = upgrade_state_dict(state_dict)
    own = model.state_dict()
    problems, keys = [], []
    for name in sorted(set(own) | set(state_dict)):
        if name not in state_dict:
            problems.append(f"{name} missing from the file")
        elif name not in own:
            problems.append(f"{name} unexpected in the file")
        elif tuple(own[name].shape) != tuple(state_dict[name].shape):
            problems.append(f"{name} is {tuple(state_dict[name].shape)} in the file but "
                            f"{tuple(own[name].shape)} in the model")
        else:
            continue
        keys.append(next(k for prefix, k in SHAPE_KEYS if name.startswith(prefix)))
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                          if len(problems) > 3 else "")
        raise RunError(f"checkpoint {path} does not match the config: {shown} "
                       f"(set by {', '.join(dict.fromkeys(keys))})")
    model.load_state_dict(state_dict)


# Run folders that other programs wrote, each read through the one module that knows its
# format (trainer/release.py: the authors' release, registered when the trainer package
# loads): name -> FolderReader. A folder no reader claims is one of ours.
FolderReader = collections.namedtuple("FolderReader", "claims read_config read_weights")
FOLDER_READERS = {}


def register_folder_reader(name, claims, read_config, read_weights):
    """Read the run folders for which `claims(run_dir)` is true with
    `read_config(run_dir, opts)` (our config for them) and `read_weights(run_dir)` (their
    best weights under this tool's names)."""
    FOLDER_READERS[name] = FolderReader(claims, read_config, read_weights)


def folder_reader(run_dir):
    """The registered reader that claims `run_dir`, or None for a run folder of ours."""
    return next((r for r in FOLDER_READERS.values() if r.claims(run_dir)), None)


def read_run_config(run_dir, opts=None):
    """The config of a run folder of this tool, or of another program (FOLDER_READERS)."""
    reader = folder_reader(run_dir)
    return reader.read_config(run_dir, opts) if reader else load_run_config(run_dir, opts)


def load_run(run_dir, opts=None):
    """(config, best.pt state) of a run folder of this tool or of another program
    (FOLDER_READERS). The state's "model" holds weights under this tool's names."""
    reader = folder_reader(run_dir)
    if reader:
        return (reader.read_config(run_dir, opts),
                {"model": reader.read_weights(run_dir), "epoch": None})
    return load_run_config(run_dir, opts), load_checkpoint(os.path.join(run_dir, BEST))


def load_run_model(run_dir, opts=None, device="cpu"):
    """(config, model with the run's best.pt weights in eval mode on `device`, best.pt state):
    the one way a saved run's model is loaded."""
    from networks import build_model
    cfg, state = load_run(run_dir, opts)
    model = build_model(cfg)
    load_model_weights(model, state["model"], os.path.join(run_dir, BEST))
    return cfg, model.to(device).eval(), state
