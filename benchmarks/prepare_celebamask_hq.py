"""Throughput of data.prepare_celebamask_hq in faces per second.

    python benchmarks/prepare_celebamask_hq.py [--faces 200] [--parts 10] [--workers 1,2]
                                               [--baseline OLD.py] [--repeat R]

Writes a synthetic release to a temporary folder (1024x1024 JPEGs of about the real
size, ~10 elliptic 512x512 part masks per face), then for each worker count times a
first run (everything built) and a second run (everything checked, nothing written).
Only the tool's main() is timed; release generation and imports are not.

--baseline times another version of the tool on the same release, its runs alternating
with the current one's (e.g. `git show HEAD:data/prepare_celebamask_hq.py > /tmp/old.py`),
so that a busy machine slows both alike; compare the ratio, not absolute numbers.
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jpeg_pool(folder, count, rng):
    """A few distinct photo-sized JPEGs (smooth shading plus grain, quality 95)."""
    paths = []
    yy, xx = np.mgrid[0:1024, 0:1024] / 1024.0
    for i in range(count):
        base = np.stack([np.sin(6 * xx + i) * 60 + 128, np.cos(5 * yy - i) * 60 + 128,
                         (xx + yy) * 60 + 60], axis=2)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"pool{i}.jpg")
        Image.fromarray(pixels).save(path, quality=95)
        paths.append(path)
    return [open(p, "rb").read() for p in paths]


def _tool():
    """data.prepare_celebamask_hq, imported once the flags are parsed: the data package
    imports torch, and --help should not wait for it."""
    from data import prepare_celebamask_hq
    return prepare_celebamask_hq


def write_release(root, faces, parts, seed=0):
    prep = _tool()
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, prep.IMAGE_DIR)
    os.makedirs(image_dir)
    jpegs = _jpeg_pool(root, 8, rng)
    for k in range(faces):
        with open(os.path.join(image_dir, f"{k}.jpg"), "wb") as f:
            f.write(jpegs[k % len(jpegs)])
        for part in rng.choice(prep.PARTS, size=parts, replace=False):
            img = Image.new("L", (prep.MASK_SIZE, prep.MASK_SIZE))
            cx, cy = rng.integers(64, 448, 2)
            rx, ry = rng.integers(20, 200, 2)
            ImageDraw.Draw(img).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
            path = prep.mask_path(os.path.join(root, prep.MASK_DIR), k, part)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            img.save(path)
    with open(os.path.join(root, prep.MAPPING_FILE), "w") as f:
        f.write("idx orig_idx orig_file\n")
        for k, orig in enumerate(rng.permutation(202599)[:faces]):
            f.write(f"{k} {orig} {orig + 1:06d}.jpg\n")
    return sum(len(j) for j in jpegs) / len(jpegs)


def _load(path):
    """Another version of the tool, imported from `path` as a module of the data package."""
    spec = importlib.util.spec_from_file_location("data._prepare_celebamask_hq_baseline", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # workers pickle
    spec.loader.exec_module(module)  # its functions by module name
    return module


def _timed(tool, argv):
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            rc = tool.main(argv)
        finally:
            sys.stdout = stdout
    if rc != 0:
        raise SystemExit(f"prepare_celebamask_hq exited with {rc}")
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=int, default=200, help="faces in the synthetic release")
    p.add_argument("--parts", type=int, default=10, help="part masks per face")
    p.add_argument("--workers", default=f"1,{os.cpu_count() or 1}",
                   help="comma-separated worker counts to time")
    p.add_argument("--size", type=int, default=64, help="also time --size S (0: off)")
    p.add_argument("--baseline", metavar="FILE", help="also time this version of the tool")
    p.add_argument("--repeat", type=int, default=1, help="runs per version and worker count")
    args = p.parse_args()
    tools = {"current": _tool(), **({"baseline": _load(args.baseline)} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as tmp:
        release = os.path.join(tmp, "release")
        t0 = time.perf_counter()
        jpeg_kb = write_release(release, args.faces, args.parts) / 1024
        print(f"synthetic release: {args.faces} faces, {args.parts} masks each, "
              f"JPEGs ~{jpeg_kb:.0f} KB, written in {time.perf_counter() - t0:.1f} s; "
              f"{os.cpu_count()} CPUs")
        for workers in sorted({int(w) for w in args.workers.split(",")}):
            best = {}
            for attempt in range(args.repeat):
                for name, tool in tools.items():  # alternating: load changes hit both
                    dst = os.path.join(tmp, f"out{workers}_{name}_{attempt}")
                    argv = ["--src", release, "--dst", dst, "--workers", str(workers)]
                    if args.size:
                        argv += ["--size", str(args.size)]
                    first, again = _timed(tool, argv), _timed(tool, argv)
                    print(f"workers={workers} {name:8}: first run {args.faces / first:7.1f} "
                          f"faces/s ({first:.2f} s), re-run check {args.faces / again:7.1f} "
                          f"faces/s ({again:.2f} s)")
                    old = best.get(name, (float("inf"),) * 2)
                    best[name] = (min(old[0], first), min(old[1], again))
            if "baseline" in best:
                (first, again), (old_first, old_again) = best["current"], best["baseline"]
                print(f"workers={workers} current/baseline speed (best of {args.repeat}): "
                      f"first run {old_first / first:.2f}x, re-run check {old_again / again:.2f}x")


if __name__ == "__main__":
    main()
