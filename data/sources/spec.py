"""What a dataset module declares (``SOURCE``), the forms its reader returns a split in, and
``Reads``, what one command has read. A dataset's shape and items are in configs/registry.py."""
import collections
import os
import weakref

from ..errors import file_state

# A split in memory (parsed files): uint8 N x C x H x W images, int64 N labels.
Arrays = collections.namedtuple("Arrays", "images labels")
# A split of one file per item: the paths, decode(path) -> uint8 C x H x W, and the stem of
# its decoded cache (data.cache) under <path_dataset>/cache/.
Files = collections.namedtuple("Files", "paths decode cache")
# A split already decoded: the rows `rows` of the uint8 N x C x H x W `array`, the file of each
# (`names`), and `record`, what a run folder keeps of the split (JSON data).
Decoded = collections.namedtuple("Decoded", "array rows names record")
# A dataset module's declaration. read(cfg, split, recorded): one split as Arrays, Files or
# Decoded (`recorded`: None, or the `record` of each split a run folder kept); split_sizes:
# n_official_train -> (n_train, n_val) where val is carved off train, else None.
Source = collections.namedtuple("Source", "name read split_sizes", defaults=(None,))


class Reads:
    """What one command has read and the notes it printed, so that its loaders share one read
    and print a note once. ``Reads.of(cfg)``: the one of a config, dropped with it."""

    _of_config = {}  # id(cfg) -> Reads, removed as that config is garbage collected

    def __init__(self):
        self._kept, self._said = {}, set()

    @classmethod
    def of(cls, cfg):
        key = id(cfg)
        if key not in cls._of_config:
            cls._of_config[key] = cls()
            weakref.finalize(cfg, cls._of_config.pop, key, None)
        return cls._of_config[key]

    def kept(self, key, paths, make):
        """``make()``, once per `key` and state (size, mtime) of the files at `paths`: a file
        replaced on disk is read afresh, and the value of its older state dropped."""
        state = [(os.path.abspath(path), *file_state(path)) for path in paths]
        if self._kept.get(key, (None,))[0] != state:
            self._kept.pop(key, None)
            self._kept[key] = (state, make())
        return self._kept[key][1]

    def say(self, text, file=None):
        """Print `text` unless this command has printed it already."""
        if text not in self._said:
            self._said.add(text)
            print(text, file=file, flush=True)
