"""Folders of pictures: every file Pillow reads under a folder (hidden ones left out), decoded
once by ``data.decode.PictureDecoder`` into ``<folder>/.sqvae-cache/pictures_CxS.npy``, or into
memory; unreadable files skipped with one warning (docs/usage.md, "Your own images")."""
import os
import sys
from typing import NamedTuple

from PIL import Image, ImageFile

from . import cache
from .decode import PictureDecoder
from .errors import DatasetError, first_few
from .sources.spec import Decoded

CACHE_FOLDER = ".sqvae-cache"


def list_pictures(folder):
    """Names (relative to `folder`, '/'-separated, sorted) of the picture files under it: those
    of the formats Pillow opens, less the stubs that need a handler from elsewhere and MPEG."""
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder} is not a folder; set path_dataset to a folder of pictures")
    Image.init()
    readable = {fmt for fmt, (factory, _) in Image.OPEN.items() if fmt != "MPEG" and not (
        isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in readable}
    names = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names += [os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                  for name in files
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions]
    if not names:
        raise DatasetError(f"no picture under {folder} (looked recursively for the files Pillow "
                           "reads: .jpg, .png, .webp, .bmp, .tif, ...); set path_dataset to a "
                           "folder of pictures")
    return sorted(names)


class Pictures(NamedTuple):
    """A folder's decoded pictures: row i of ``array`` (uint8 N x C x H x W, memory-mapped or in
    memory) for ``names[i]``; the rows of ``skipped`` (not decoded) are zero."""
    names: list
    array: object
    skipped: set

    def split(self, names, where):
        """The Decoded split of `names`, its record listing those skipped; none decoded: a
        DatasetError naming the pictures `where` they are."""
        index = {name: i for i, name in enumerate(self.names)}
        kept = [n for n in names if n not in self.skipped]
        if not kept:
            raise DatasetError(f"none of the {len(names)} pictures {where} can be decoded")
        return Decoded(self.array, [index[n] for n in kept], kept,
                       {"files": kept, "skipped": [n for n in names if n in self.skipped]})


def decoded(folder, names, shape, *, cached=True, reads):
    """The Pictures of `names` at square `shape` (C, S, S), decoded once per state of the files
    for `reads` (one command's), which reports the skipped ones once."""
    channels, size, width = shape = tuple(shape)
    if size != width:
        raise ValueError(f"pictures are decoded square, not {size}x{width}")
    paths = [os.path.join(folder, name) for name in names]

    def decode():
        common = dict(decode=PictureDecoder(channels, size), shape=shape, what=folder,
                      skip_unreadable=True)
        found = cached and cache.open_or_build(
            os.path.join(folder, CACHE_FOLDER, f"pictures_{channels}x{size}.npy"), root=folder,
            paths=paths, instead="decoding them into memory for this run instead", **common)
        array, skipped = found or cache.decode_all(paths, **common)
        return Pictures(list(names), array, {names[i] for i in skipped})

    found = reads.kept(("pictures", folder, shape, cached), paths, decode)
    if found.skipped:
        skipped = [n for n in found.names if n in found.skipped]
        reads.say(f"warning: {len(skipped)} of the {len(names)} pictures under {folder} cannot "
                  f"be decoded and are skipped: {first_few(skipped)}", file=sys.stderr)
    return found
