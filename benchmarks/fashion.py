"""The Fashion-MNIST subsets the benchmarks train on: the first images of Debian's
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), written as IDX files that
``--data mnist:DIR`` reads."""

import gzip
import os
import sys

FASHION = "/usr/share/datasets/fashion-mnist"


def subset(source: str, folder: str, train: int, test: int) -> str:
    """An IDX folder with the first ``train``/``test`` images of ``source`` (``mnist:`` reads it)."""
    if not os.path.isfile(os.path.join(source, "t10k-labels-idx1-ubyte.gz")):
        sys.exit(f"no Fashion-MNIST in {source}: apt-get install dataset-fashion-mnist (the benchmarks need its IDX files)")
    os.makedirs(folder, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        for kind, header in (("images-idx3-ubyte", 16), ("labels-idx1-ubyte", 8)):
            out = os.path.join(folder, f"{prefix}-{kind}")
            if os.path.exists(out):
                continue
            with gzip.open(os.path.join(source, f"{prefix}-{kind}.gz"), "rb") as f:
                data = bytearray(f.read())
            data[4:8] = count.to_bytes(4, "big")
            item = 28 * 28 if "images" in kind else 1
            with open(out, "wb") as f:
                f.write(bytes(data[: header + count * item]))
    return folder
