"""Datasets named by a short spec, shaped to fit the model.

Specs, usable everywhere a command takes ``--data``:

- ``digits``: the 8x8 handwritten digits that scikit-learn ships (1,797 images, 10 classes),
  split 80/20 with a fixed seed. Works offline; the embedded default.
- ``mnist:DIR``: MNIST-format IDX files (``train-images-idx3-ubyte[.gz]`` ...), so also
  Fashion-MNIST, KMNIST and other IDX datasets.
- ``cifar10:DIR`` / ``cifar100:DIR``: the standard python batches already on disk, read with
  torchvision (they are pickles: load only files you trust). dscompress downloads no data.
- ``imagefolder:DIR``: ``DIR/train/<class>/*.png`` and ``DIR/val/<class>/...`` (or ``test/``).

Segmentation data (a class per pixel; :data:`~dscompress.nn.metrics.IGNORE_INDEX` 255 marks pixels
that are not scored):

- ``digits-seg``: built in and offline, from the same digits (and the same 80/20 split, so test
  canvases hold only held-out digits). Each 32x32 canvas is a 2x2 grid of 16x16 cells; each cell
  holds, with probability 3/4 (at least one per canvas), a digit scaled to 10-16 pixels at a
  random place in its cell. A pixel's label is its digit's class where the ink is at least
  :data:`DIGITS_SEG_INK` of full, else background. 11 classes: **0 is background**, class
  ``d + 1`` is digit ``d``. 1,000 training and 250 test canvases, a function of the seed only
  (:func:`digits_seg_arrays`).
- ``voc:DIR``: PASCAL VOC (``JPEGImages/``, ``SegmentationClass/``,
  ``ImageSets/Segmentation/{train,val}.txt``; DIR may also be the folder holding ``VOCdevkit/``
  or ``VOC2012/``), 21 classes, the test split is ``val``.
- ``segfolder:DIR``: ``DIR/images/{train,val}/NAME.jpg|png`` and ``DIR/masks/{train,val}/NAME.png``
  (single-channel or palette PNGs whose values are class indices, 255 = ignore); the class names
  are the lines of ``DIR/classes.txt``, or without it ``0 .. max`` over the training masks.

Every dataset yields ``(image, target)`` with ``image`` a float tensor (C, H, W) of the model's
input size: resized, grayscale repeated to 3 channels (or RGB averaged to 1), normalised with
the ImageNet mean and standard deviation that torchvision's pretrained weights expect. The
target is a class index, or for segmentation data an int64 mask (H, W) resized nearest-neighbour
(with half-pixel centres, as the bilinear image resize) so it stays aligned with the image. A
dataset has ``classes`` (names, one per class index) and ``task`` (``classification`` or
``segmentation``).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from dscompress.core.errors import DscompressError
from dscompress.nn.metrics import IGNORE_INDEX

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "test")
KINDS = ("digits", "mnist", "cifar10", "cifar100", "imagefolder", "digits-seg", "voc", "segfolder")
BUILT_IN = ("digits", "digits-seg")
SEGMENTATION_KINDS = ("digits-seg", "voc", "segfolder")
DIGITS_SEED = 0
DIGITS_TEST_SHARE = 0.2
# digits-seg: canvas side, grid cells per side, digit sizes, chance a cell holds a digit, the ink
# (share of full intensity) from which a pixel is labelled with its digit, canvases per split.
DIGITS_SEG_CANVAS = 32
DIGITS_SEG_GRID = 2
DIGITS_SEG_SIZES = (10, 16)
DIGITS_SEG_FILL = 0.75
DIGITS_SEG_INK = 0.3
DIGITS_SEG_COUNTS = {"train": 1000, "test": 250}
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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
            raise DscompressError(
                f"unknown dataset {text!r}; use digits, mnist:DIR, cifar10:DIR, cifar100:DIR or imagefolder:DIR "
                "(segmentation: digits-seg, voc:DIR or segfolder:DIR)"
            )
        if kind in BUILT_IN:
            if root:
                raise DscompressError(f"{kind} is built in and takes no folder; write --data {kind}")
            return cls(kind)
        if not root:
            raise DscompressError(f"{kind} needs a folder: --data {kind}:DIR")
        root = os.path.expanduser(root)
        return cls(kind, root)

    def __str__(self) -> str:
        return self.kind if self.root is None else f"{self.kind}:{self.root}"

    @property
    def task(self) -> str:
        """``segmentation`` for per-pixel labels, else ``classification``."""
        return "segmentation" if self.kind in SEGMENTATION_KINDS else "classification"


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


def shape_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(h, w) class indices -> (height, width) int64, resized nearest-neighbour with half-pixel
    centres (``nearest-exact``), the sampling grid of the bilinear image resize."""
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != (height, width):
        mask = TF.resize(mask[None], [height, width], interpolation=InterpolationMode.NEAREST_EXACT)[0]
    return mask.long()


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, C, h, w), shaped to the input size one at a time."""

    task = "classification"

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

    task = "classification"

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


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, (N, 8, 8) float32 values 0..16 and labels, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images.astype(np.float32), digits.target, test_size=DIGITS_TEST_SHARE, random_state=DIGITS_SEED, stratify=digits.target
    )
    return (train_x, train_y) if split == "train" else (test_x, test_y)


def _digits(split: str, input_size) -> Dataset:
    x, y = _digits_split(split)
    return ArrayDataset(x[:, None], y, input_size, [str(i) for i in range(10)], scale=16.0)  # (N, 1, 8, 8)


# --- segmentation data ---------------------------------------------------------------------------


class MaskArrayDataset(Dataset):
    """Images (N, C, h, w) and masks (N, h, w) held in memory, shaped to the input size one at a time."""

    task = "segmentation"
    ignore_index = IGNORE_INDEX

    def __init__(self, images: np.ndarray, masks: np.ndarray, input_size, classes: list[str], scale: float = 255.0):
        self.images = torch.from_numpy(np.array(images, order="C"))
        self.masks = torch.from_numpy(np.array(masks, order="C"))
        self.input_size = tuple(input_size)
        self.classes = classes
        self.scale = scale

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index):
        image = self.images[index : index + 1].float() / self.scale
        _, height, width = self.input_size
        return shape_images(image, self.input_size)[0], shape_mask(self.masks[index], height, width)


def digits_seg_arrays(split: str, seed: int = DIGITS_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The digits-seg canvases of a split: images (N, 1, 32, 32) float32 in [0, 1] and masks
    (N, 32, 32) uint8 (0 = background, d + 1 = digit d). The same ``seed`` gives the same arrays.

    The digits come from the ``digits`` split of the same name, so test canvases hold only
    digits that no training canvas holds.
    """
    x, y = _digits_split(split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    count, side, cell = DIGITS_SEG_COUNTS[split], DIGITS_SEG_CANVAS, DIGITS_SEG_CANVAS // DIGITS_SEG_GRID
    images = np.zeros((count, 1, side, side), dtype=np.float32)
    masks = np.zeros((count, side, side), dtype=np.uint8)
    cells = [(r, c) for r in range(DIGITS_SEG_GRID) for c in range(DIGITS_SEG_GRID)]
    for i in range(count):
        filled = rng.random(len(cells)) < DIGITS_SEG_FILL
        if not filled.any():
            filled[rng.integers(len(cells))] = True
        for (row, col), used in zip(cells, filled):
            if not used:
                continue
            pick = int(rng.integers(len(x)))
            size = int(rng.integers(DIGITS_SEG_SIZES[0], DIGITS_SEG_SIZES[1] + 1))
            top = row * cell + int(rng.integers(cell - size + 1))
            left = col * cell + int(rng.integers(cell - size + 1))
            digit = torch.from_numpy(x[pick] / 16.0)[None, None].float()
            ink = torch.nn.functional.interpolate(digit, size=(size, size), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
            images[i, 0, top : top + size, left : left + size] = ink
            masks[i, top : top + size, left : left + size] = np.where(ink >= DIGITS_SEG_INK, y[pick] + 1, 0)
    return images, masks


def _digits_seg(split: str, input_size) -> Dataset:
    images, masks = digits_seg_arrays(split)
    return MaskArrayDataset(images, masks, input_size, ["background"] + [str(d) for d in range(10)], scale=1.0)


class MaskFiles(Dataset):
    """Image and mask files on disk, read and shaped one pair at a time.

    A mask is a single-channel (or palette) image of class indices the size of its image; a
    value outside ``0 .. classes - 1`` other than 255 (ignore) is an error naming the file.
    """

    task = "segmentation"
    ignore_index = IGNORE_INDEX

    def __init__(self, pairs: list[tuple[str, str]], input_size, classes: list[str], name: str):
        self.pairs = pairs
        self.input_size = tuple(input_size)
        self.classes = list(classes)
        self.name = name

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        from PIL import Image

        image_path, mask_path = self.pairs[index]
        channels, height, width = self.input_size
        try:
            with Image.open(image_path) as image:
                pixels = np.array(image.convert("L" if channels == 1 else "RGB"))
            with Image.open(mask_path) as mask_image:
                mask = np.array(mask_image)
        except OSError as e:
            raise DscompressError(f"{self.name}: cannot read {image_path} or {mask_path}: {e}") from None
        if mask.ndim != 2:
            raise DscompressError(f"{self.name}: {mask_path} has {mask.shape[-1]} channels; a mask holds one class index per pixel (a grayscale or palette PNG)")
        if mask.shape != pixels.shape[:2]:
            raise DscompressError(f"{self.name}: {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is {pixels.shape[1]}x{pixels.shape[0]}")
        check_mask(mask, len(self.classes), f"{self.name}: {mask_path}")
        tensor = torch.from_numpy(pixels).float() / 255.0
        tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        return shape_images(tensor[None], self.input_size)[0], shape_mask(torch.from_numpy(mask.astype(np.int64)), height, width)


def check_mask(mask: np.ndarray, classes: int, where: str) -> None:
    """Raise one line when a mask holds a value that is neither a class index nor 255 (ignore)."""
    values = np.unique(mask)
    bad = values[(values >= classes) & (values != IGNORE_INDEX)]
    if len(bad) or (len(values) and values.min() < 0):
        value = int(bad[0]) if len(bad) else int(values.min())
        raise DscompressError(f"{where} holds class {value}, outside 0..{classes - 1} ({classes} classes; {IGNORE_INDEX} = ignore)")


def _voc(root: str, split: str, input_size) -> Dataset:
    """Kept over torchvision's VOCSegmentation, which wants ROOT/VOCdevkit/VOC2012 exactly and checks
    no listed file: this takes the VOC2012 folder wherever it is and names a missing file up front."""
    candidates = [root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")]
    base = next((c for c in candidates if os.path.isdir(os.path.join(c, "JPEGImages"))), None)
    if base is None:
        raise DscompressError(f"voc: no JPEGImages/ in {root} (nor VOC2012/ or VOCdevkit/VOC2012/ under it); give the VOC2012 folder")
    name = "train" if split == "train" else "val"
    listing = os.path.join(base, "ImageSets", "Segmentation", f"{name}.txt")
    if not os.path.isfile(listing):
        raise DscompressError(f"voc: {listing} is missing; the segmentation split lists are in ImageSets/Segmentation/")
    with open(listing) as f:
        stems = [line.strip() for line in f if line.strip()]
    pairs = [(os.path.join(base, "JPEGImages", s + ".jpg"), os.path.join(base, "SegmentationClass", s + ".png")) for s in stems]
    missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
    if missing:
        raise DscompressError(f"voc: {len(missing)} files listed in {listing} are missing, e.g. {missing[0]}")
    return MaskFiles(pairs, input_size, list(VOC_CLASSES), "voc")


def _segfolder(root: str, split: str, input_size) -> Dataset:
    names = ("train",) if split == "train" else ("val", "test")
    sub = next((n for n in names if os.path.isdir(os.path.join(root, "images", n))), None)
    if sub is None:
        raise DscompressError(f"segfolder: {root} needs images/{' or images/'.join(names)} and masks/ beside it with the same names")
    image_dir, mask_dir = os.path.join(root, "images", sub), os.path.join(root, "masks", sub)
    if not os.path.isdir(mask_dir):
        raise DscompressError(f"segfolder: {mask_dir} is missing; every image in {image_dir} needs a mask there with the same name (.png)")
    images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        raise DscompressError(f"segfolder: no images in {image_dir}")
    pairs, missing = [], []
    for file in images:
        mask = os.path.join(mask_dir, os.path.splitext(file)[0] + ".png")
        (pairs if os.path.isfile(mask) else missing).append((os.path.join(image_dir, file), mask))
    if missing:
        raise DscompressError(f"segfolder: {len(missing)} images have no mask, e.g. {missing[0][0]} (expected {missing[0][1]})")
    return MaskFiles(pairs, input_size, _segfolder_classes(root), "segfolder")


def _segfolder_classes(root: str) -> list[str]:
    """The lines of ``classes.txt``, or ``0 .. max`` over the training masks (ignoring 255)."""
    listing = os.path.join(root, "classes.txt")
    if os.path.isfile(listing):
        with open(listing) as f:
            names = [line.strip() for line in f if line.strip()]
        if not names:
            raise DscompressError(f"segfolder: {listing} is empty; list one class name per line")
        return names
    from PIL import Image

    mask_dir = os.path.join(root, "masks", "train")
    highest = 0
    for file in sorted(os.listdir(mask_dir)) if os.path.isdir(mask_dir) else []:
        if file.lower().endswith(".png"):
            with Image.open(os.path.join(mask_dir, file)) as mask:
                values = np.unique(np.array(mask))
            values = values[values != IGNORE_INDEX]
            highest = max(highest, int(values.max()) if len(values) else 0)
    return [str(c) for c in range(highest + 1)]


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    Kept over torchvision's ``read_image_file``/``read_label_file``, which open plain files only
    (no .gz) and assert on a bad header: this reads .gz in place and says in one line what is wrong.
    """
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
    folder = base.base_folder
    if os.path.basename(os.path.normpath(root)) == folder:
        root = os.path.dirname(os.path.normpath(root))
    if not os.path.isdir(os.path.join(root, folder)):
        raise DscompressError(f"{kind}: no {folder}/ under {root}; put the CIFAR python batches there (dscompress does not download data)")
    files = [name for name, _ in base.train_list + base.test_list] + [base.meta["filename"]]
    missing = [name for name in files if not os.path.isfile(os.path.join(root, folder, name))]
    if missing:
        raise DscompressError(f"{kind}: {os.path.join(root, folder)} lacks {', '.join(missing)}; put all the CIFAR python batches there")

    class LocalCIFAR(base):
        # Without md5 sums torchvision only checks that the files are there: the sums guard
        # downloads, and a local copy (perhaps re-packed) is trusted as it is.
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    dataset = LocalCIFAR(root, train=split == "train", download=False)
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

    The dataset has ``classes`` (class names, one per label) and ``task`` attributes.
    """
    spec = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec.root is not None and not os.path.isdir(spec.root):
        raise DscompressError(f"{spec.kind}: folder {spec.root!r} does not exist")
    if spec.kind == "digits":
        return _digits(split, input_size)
    if spec.kind == "digits-seg":
        return _digits_seg(split, input_size)
    if spec.kind == "voc":
        return _voc(spec.root, split, input_size)
    if spec.kind == "segfolder":
        return _segfolder(spec.root, split, input_size)
    if spec.kind == "mnist":
        return _mnist(spec.root, split, input_size)
    if spec.kind in ("cifar10", "cifar100"):
        return _cifar(spec.kind, spec.root, split, input_size)
    return _imagefolder(spec.root, split, input_size)


def num_classes(dataset: Dataset) -> int:
    return len(dataset.classes)


def data_task(dataset: Dataset) -> str:
    """``segmentation`` for a dataset of masks, else ``classification``."""
    return getattr(dataset, "task", "classification")


def check_task(dataset: Dataset, task: str, data_name: str = "the data", model_name: str = "the model") -> None:
    """Raise one line when the data's labels are not what a model of ``task`` predicts."""
    kind = data_task(dataset)
    if kind == task:
        return
    if task == "segmentation":
        raise DscompressError(
            f"{data_name} is classification data (one label per image) but {model_name} is a segmentation model; "
            "give segmentation data: digits-seg, voc:DIR or segfolder:DIR"
        )
    raise DscompressError(
        f"{data_name} is segmentation data (a class per pixel) but {model_name} is a classification model; "
        "give classification data (digits, mnist:DIR, ...) or a segmentation model (`dscompress models` lists them)"
    )


def check_classes(dataset: Dataset, outputs: int, data_name: str = "the data", task: str = "classification",
                  model_name: str = "the model") -> None:
    """Raise one line when the data does not fit a ``task`` model with ``outputs`` outputs (see
    :func:`~dscompress.models.build.output_classes`): labels of another task (see
    :func:`check_task`), or not one class of the dataset per output."""
    check_task(dataset, task, data_name, model_name)
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


def split_validation(dataset: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): a seeded ``share`` of ``dataset`` held out."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, int(round(share * len(dataset))))
    train, val = Subset(dataset, sorted(order[held:])), Subset(dataset, sorted(order[:held]))
    train.classes = val.classes = dataset.classes
    train.task = val.task = data_task(dataset)
    return train, val
