"""Datasets named by a short spec, shaped to fit the model.

Specs, usable everywhere a command takes ``--data``:

- ``digits``: the 8x8 handwritten digits that scikit-learn ships (1,797 images, 10 classes),
  split 80/20 with a fixed seed. Works offline; the embedded default.
- ``mnist:DIR``: MNIST-format IDX files (``train-images-idx3-ubyte[.gz]`` ...), so also
  Fashion-MNIST, KMNIST and other IDX datasets.
- ``cifar10:DIR`` / ``cifar100:DIR``: the standard python batches already on disk, read with
  torchvision (they are pickles: load only files you trust). dscompress downloads no data.
- ``imagefolder:DIR``: ``DIR/train/<class>/*.png`` and ``DIR/val/<class>/...`` (or ``test/``).

Every dataset yields ``(image, label)`` with ``image`` a float tensor (C, H, W) of the model's
input size: resized, grayscale repeated to 3 channels (or RGB averaged to 1), normalised with
the ImageNet mean and standard deviation that torchvision's pretrained weights expect.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from dscompress.errors import DscompressError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "test")
KINDS = ("digits", "mnist", "cifar10", "cifar100", "imagefolder")
DIGITS_SEED = 0
DIGITS_TEST_SHARE = 0.2


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: the kind of dataset and, except for digits, its folder."""

    kind: str
    root: str | None = None

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        kind, _, root = text.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise DscompressError(f"unknown dataset {text!r}; use digits, mnist:DIR, cifar10:DIR, cifar100:DIR or imagefolder:DIR")
        if kind == "digits":
            if root:
                raise DscompressError("digits is built in and takes no folder; write --data digits")
            return cls(kind)
        if not root:
            raise DscompressError(f"{kind} needs a folder: --data {kind}:DIR")
        root = os.path.expanduser(root)
        return cls(kind, root)

    def __str__(self) -> str:
        return self.kind if self.root is None else f"{self.kind}:{self.root}"


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: what anyone feeding the model (or its ONNX file) must do.

    An image with values in [0, 1] is given ``channels`` (grayscale repeated, RGB averaged to
    one), resized to ``height`` x ``width`` (bilinear, antialiased), then normalised with ``mean``
    and ``std`` per channel. Recorded in every artifact's manifest and exported ONNX file.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_input(cls, input_size) -> Preprocess:
        """The preprocessing dscompress's datasets use for inputs of ``input_size`` (C, H, W)."""
        channels, height, width = (int(v) for v in input_size)
        if channels == 3:
            mean, std = MEAN, STD
        elif channels == 1:
            mean, std = (sum(MEAN) / 3,), (sum(STD) / 3,)
        else:
            mean, std = (0.5,) * channels, (0.25,) * channels
        return cls(channels, height, width, tuple(mean), tuple(std))

    def to_dict(self) -> dict:
        return {
            "input_size": [self.channels, self.height, self.width],
            "value_range": [0.0, 1.0],
            "resize": "bilinear, antialiased",
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW float32",
        }

    def transform(self) -> v2.Compose:
        """The torchvision ``transforms.v2`` pipeline for float images (N, C, h, w) in [0, 1]
        that already have ``channels`` channels."""
        return v2.Compose([v2.Resize((self.height, self.width), antialias=True), v2.Normalize(list(self.mean), list(self.std))])


def shape_images(images: torch.Tensor, input_size: tuple[int, int, int]) -> torch.Tensor:
    """(N, C, h, w) floats in [0, 1] -> (N, *input_size), channel-matched, resized, normalised."""
    preprocess = Preprocess.for_input(input_size)
    channels = preprocess.channels
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images.mean(dim=1, keepdim=True)
        else:
            raise DscompressError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
    return preprocess.transform()(images).contiguous()


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, C, h, w), shaped to the input size one at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, input_size, classes: list[str], scale: float = 255.0):
        self.images = torch.from_numpy(np.array(images, order="C"))  # a writable copy (IDX arrays are read-only views)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.input_size = tuple(input_size)
        self.classes = classes
        self.scale = scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index : index + 1].float() / self.scale
        return shape_images(image, self.input_size)[0], int(self.labels[index])


class _ShapedImages(Dataset):
    """Wraps a torchvision dataset of PIL images so it yields shaped tensors."""

    def __init__(self, dataset, input_size, classes):
        self.dataset = dataset
        self.input_size = tuple(input_size)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        from torchvision.transforms.functional import pil_to_tensor

        image, label = self.dataset[index]
        tensor = pil_to_tensor(image).float()[None] / 255.0
        return shape_images(tensor, self.input_size)[0], int(label)


def _digits(split: str, input_size) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (1797, 1, 8, 8), values 0..16
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_SHARE, random_state=DIGITS_SEED, stratify=digits.target
    )
    x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
    return ArrayDataset(x, y, input_size, [str(i) for i in range(10)], scale=16.0)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DscompressError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DscompressError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DscompressError(f"{path} has an unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DscompressError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _find(root: str, stems: tuple[str, ...]) -> str:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(root, name)):
                return os.path.join(root, name)
    raise DscompressError(f"{root} has no {stems[0]}[.gz]; an IDX folder holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")


def _mnist(root: str, split: str, input_size) -> Dataset:
    prefix = ("train",) if split == "train" else ("t10k", "test")
    images = read_idx(_find(root, tuple(f"{p}-images-idx3-ubyte" for p in prefix) + tuple(f"{p}-images.idx3-ubyte" for p in prefix)))
    labels = read_idx(_find(root, tuple(f"{p}-labels-idx1-ubyte" for p in prefix) + tuple(f"{p}-labels.idx1-ubyte" for p in prefix)))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DscompressError(f"{root}: IDX images {images.shape} and labels {labels.shape} do not pair up")
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    return ArrayDataset(images[:, None], labels, input_size, classes)


def _cifar(kind: str, root: str, split: str, input_size) -> Dataset:
    import torchvision

    base = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100

    class LocalCIFAR(base):
        # The md5 sums only guard downloads; re-packed local copies are trusted as they are.
        def _check_integrity(self) -> bool:
            files = self.train_list + self.test_list
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name, _ in files)

        def _load_meta(self) -> None:
            import pickle

            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not os.path.isfile(path):
                raise RuntimeError(f"no {self.meta['filename']} (the class names)")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    folder = LocalCIFAR.base_folder
    if os.path.basename(os.path.normpath(root)) == folder:
        root = os.path.dirname(os.path.normpath(root))
    if not os.path.isdir(os.path.join(root, folder)):
        raise DscompressError(f"{kind}: no {folder}/ under {root}; put the CIFAR python batches there (dscompress does not download data)")
    try:
        dataset = LocalCIFAR(root, train=split == "train", download=False)
    except RuntimeError as e:
        raise DscompressError(f"{kind}: {e} (looked in {os.path.join(root, folder)})") from None
    return _ShapedImages(dataset, input_size, list(dataset.classes))


def _imagefolder(root: str, split: str, input_size) -> Dataset:
    import torchvision

    names = ("train",) if split == "train" else ("val", "test")
    folder = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
    if folder is None:
        raise DscompressError(f"imagefolder: {root} needs {' or '.join(n + '/' for n in names)} with one subfolder per class")
    try:
        dataset = torchvision.datasets.ImageFolder(folder)
    except (FileNotFoundError, RuntimeError) as e:
        raise DscompressError(f"imagefolder: {e}") from None
    return _ShapedImages(dataset, input_size, list(dataset.classes))


def load_dataset(spec: str | DataSpec, input_size, split: str = "train") -> Dataset:
    """The ``split`` ("train" or "test") of the dataset a spec names, shaped to ``input_size``.

    The dataset has a ``classes`` attribute (class names, one per label).
    """
    spec = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec.root is not None and not os.path.isdir(spec.root):
        raise DscompressError(f"{spec.kind}: folder {spec.root!r} does not exist")
    if spec.kind == "digits":
        return _digits(split, input_size)
    if spec.kind == "mnist":
        return _mnist(spec.root, split, input_size)
    if spec.kind in ("cifar10", "cifar100"):
        return _cifar(spec.kind, spec.root, split, input_size)
    return _imagefolder(spec.root, split, input_size)


def num_classes(dataset: Dataset) -> int:
    return len(dataset.classes)


def check_classes(dataset: Dataset, model: torch.nn.Module, input_size, data_name: str = "the data") -> None:
    """Raise when the model's head does not have one output per class of the dataset."""
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = model(torch.zeros(1, *input_size, device=device)).shape[-1]
    model.train(was_training)
    classes = num_classes(dataset)
    if outputs != classes:
        raise DscompressError(
            f"{data_name} has {classes} classes but the model has {outputs} outputs; "
            f"build the model with --num-classes {classes} (or fine-tune a baseline with it first)"
        )


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0, sampler=None) -> DataLoader:
    """A DataLoader whose shuffling is fixed by ``seed``, so runs repeat exactly."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        persistent_workers=workers > 0,
    )
