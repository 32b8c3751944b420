"""Small data helpers: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX, gzip).

``apt-get install -y dataset-fashion-mnist`` puts the four files under
``/usr/share/datasets/fashion-mnist/``; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch

from .errors import UsageError

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # of the training images, for normalization


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (optionally gzip-compressed) into a tensor of its dtype and shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UsageError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def fashion_mnist(split: str = "train", folder: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, 28, 28] float32 normalized, labels [N] int64)`` for ``train`` or ``test``."""
    folder = Path(folder or FASHION_MNIST_DIR)
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise UsageError(f"Fashion-MNIST not found in {folder}: apt-get install -y dataset-fashion-mnist "
                         "(or set FASHION_MNIST_DIR)")
    x = read_idx(images).float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, read_idx(labels).long()
