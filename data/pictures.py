"""Every picture Pillow reads under a folder (hidden files left out), decoded once by
``PictureDecoder`` into ``<folder>/.sqvae-cache/`` or memory; unreadable ones skipped, warned."""
import os
import sys

from PIL import Image, ImageFile

from . import cache
from .decode import PictureDecoder
from .errors import DatasetError, first_few
from .sources.spec import Decoded


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


def decoded(folder, names, shape, *, cached=True, reads, wanted, where):
    """The Decoded split `wanted` of `names` at square `shape` (C, S, S), its record listing the
    skipped; all decoded once per state of the files for `reads`, which warns once; else error."""
    channels, size, width = shape = tuple(shape)
    if size != width:
        raise ValueError(f"pictures are decoded square, not {size}x{width}")
    paths = [os.path.join(folder, name) for name in names]

    def decode():
        common = dict(decode=PictureDecoder(channels, size), shape=shape, what=folder,
                      skip_unreadable=True)
        found = cached and cache.open_or_build(
            os.path.join(folder, ".sqvae-cache", f"pictures_{channels}x{size}.npy"), root=folder,
            paths=paths, instead="decoding them into memory for this run instead", **common)
        array, skipped = found or cache.decode_all(paths, **common)
        return array, {names[i] for i in skipped}

    array, skipped = reads.kept(("pictures", folder, shape, cached), paths, decode)
    if skipped:
        listed = [n for n in names if n in skipped]
        reads.say(f"warning: {len(listed)} of the {len(names)} pictures under {folder} cannot "
                  f"be decoded and are skipped: {first_few(listed)}", file=sys.stderr)
    kept = [n for n in wanted if n not in skipped]
    if not kept:
        raise DatasetError(f"none of the {len(wanted)} pictures {where} can be decoded")
    index = {name: i for i, name in enumerate(names)}
    return Decoded(array, [index[n] for n in kept], kept,
                   {"files": kept, "skipped": [n for n in wanted if n in skipped]})
