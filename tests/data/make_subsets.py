"""Write the small MNIST / Fashion-MNIST subsets shipped under tests/data/.

    python tests/data/make_subsets.py FULL_DATA_ROOT

FULL_DATA_ROOT holds the official files in torchvision's layout
(<root>/<name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte). Each subset keeps the
first N records of a file, rewrites the idx header's count, and is gzip'ed with a fixed
timestamp, so running this again gives byte-identical files.
"""
import gzip
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> (training images kept, test images kept)
SUBSETS = {"MNIST": (2000, 10000), "FashionMNIST": (1000, 500)}


def first_records(path, count):
    with open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = list(struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]))
    record = 1
    for d in dims[1:]:
        record *= d
    header = 4 + 4 * ndim
    dims[0] = count
    return raw[:4] + struct.pack(f">{ndim}I", *dims) + raw[header:header + count * record]


def main(root):
    for name, (n_train, n_test) in SUBSETS.items():
        out = os.path.join(HERE, name, "raw")
        os.makedirs(out, exist_ok=True)
        for prefix, count in (("train", n_train), ("t10k", n_test)):
            for kind in ("images-idx3", "labels-idx1"):
                base = f"{prefix}-{kind}-ubyte"
                data = first_records(os.path.join(root, name, "raw", base), count)
                with open(os.path.join(out, base + ".gz"), "wb") as f:
                    f.write(gzip.compress(data, compresslevel=9, mtime=0))


if __name__ == "__main__":
    main(sys.argv[1])
