"""Folders of pictures: every file Pillow reads under a folder, decoded once to one shape.

``list_pictures(folder)`` finds the pictures, recursively: files whose extension is one
Pillow opens (JPEG, PNG, WebP, BMP, TIFF, GIF, ...), in sorted order of their names
relative to the folder ('/'-separated); hidden files and folders are left out, the cache's
own among them. ``decoded(folder, names, shape)`` decodes them to uint8 C x H x W with
``data.decode.PictureDecoder`` into one cache, ``<folder>/.sqvae-cache/pictures_CxS.npy``
(``data.cache``: rebuilt when a file or the shape changes, with a progress bar on a
terminal), or into memory where the folder is read-only or ``cache_decoded`` is False. A
file that cannot be decoded is skipped: one warning line gives the count and the first few
names, once per command; no readable picture at all, or none among the first
``data.cache.FIRST_FAILURES`` (256), is a DatasetError.
"""
import os
import sys
from typing import NamedTuple

from PIL import Image, ImageFile

from . import cache
from .decode import PictureDecoder
from .errors import DatasetError

CACHE_FOLDER = ".sqvae-cache"


def picture_extensions():
    """The file extensions (lower case, with the dot) of the formats Pillow can decode here:
    those it opens, less the stubs that need a handler from elsewhere and MPEG (identified,
    never decoded)."""
    Image.init()
    readable = {fmt for fmt, (factory, _) in Image.OPEN.items()
                if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    readable.discard("MPEG")
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in readable}


def list_pictures(folder):
    """Names (relative to `folder`, '/'-separated, sorted) of the picture files under it."""
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder} is not a folder; set path_dataset to a folder of pictures")
    extensions = picture_extensions()
    names = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                names.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(names)


def no_pictures(folder):
    return DatasetError(f"no picture under {folder} (looked recursively for the files Pillow "
                        "reads: .jpg, .png, .webp, .bmp, .tif, ...); set path_dataset to a "
                        "folder of pictures")


class Pictures(NamedTuple):
    """The decoded pictures of a folder: ``array`` (uint8 N x C x H x W, a memory map or in
    memory) holds row i for ``names[i]``; the rows of ``skipped`` (names that could not be
    decoded) are zero."""

    folder: str
    names: list
    array: object
    skipped: set

    def rows(self, names):
        """The array rows of those of `names` that were decoded, and those names."""
        index = {name: i for i, name in enumerate(self.names)}
        kept = [n for n in names if n not in self.skipped]
        return [index[n] for n in kept], kept


# Decoded pictures per (folder, names with their sizes and mtimes, shape, caching): the
# train, val and test splits of one folder share a single decoding.
_DECODED = {}
# Skipped files reported: decoding key -> the object (a command's config) they were reported
# for, held so that its identity stays its own.
_REPORTED = {}


def _state(folder, names):
    state = []
    for name in names:
        try:
            st = os.stat(os.path.join(folder, name))
        except OSError as e:
            raise DatasetError(f"cannot read {os.path.join(folder, name)}: {e.strerror}") from None
        state.append((name, st.st_size, st.st_mtime_ns))
    return tuple(state)


def decoded(folder, names, shape, *, cached=True, said_for=None):
    """The Pictures of `names` (relative to `folder`) at `shape` (C, H, W) with H == W. Its
    skipped files are reported once for `said_for` (one command's config)."""
    channels, size, width = shape
    if size != width:
        raise ValueError(f"pictures are decoded square, not {size}x{width}")
    if not names:
        raise no_pictures(folder)
    key = (folder, _state(folder, names), tuple(shape), cached)
    if key not in _DECODED:
        _DECODED.clear()  # one folder state at a time: older arrays are not kept alive
        _DECODED[key] = _decode(folder, list(names), tuple(shape), cached)
    found = _DECODED[key]
    if found.skipped and (said_for is None or _REPORTED.get(key) is not said_for):
        _REPORTED[key] = said_for
        skipped = [n for n in found.names if n in found.skipped]
        shown = ", ".join(skipped[:cache.NAMES_SHOWN]) + (
            ", ..." if len(skipped) > cache.NAMES_SHOWN else "")
        print(f"warning: {len(skipped)} of the {len(names)} pictures under {folder} cannot "
              f"be decoded and are skipped: {shown}", file=sys.stderr, flush=True)
    return found


def _decode(folder, names, shape, cached):
    paths = [os.path.join(folder, name) for name in names]
    decode = PictureDecoder(shape[0], shape[1])
    common = dict(decode=decode, shape=shape, what=folder, workers=cache.build_workers(),
                  skip_unreadable=True)
    found = None
    if cached:
        path = cache.cache_path(folder, f"pictures_{shape[0]}x{shape[1]}", CACHE_FOLDER)
        found = cache.open_or_build(path, root=folder, paths=paths,
                                    instead="decoding them into memory for this run instead",
                                    **common)
    array, skipped = found if found is not None else cache.decode_all(paths, **common)
    return Pictures(folder, names, array, {names[i] for i in skipped})
