import gzip

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dscompress.core.errors import DscompressError
from dscompress.data.datasets import DataSpec, check_classes, load_dataset, make_loader, read_idx, shape_images, shape_mask


def write_idx(path, array: np.ndarray, compress: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.fixture
def idx_folder(tmp_path):
    """Real digits written as MNIST-format IDX files (28x28, like MNIST)."""
    digits = load_digits()
    images = torch.nn.functional.interpolate(torch.tensor(digits.images[:, None] * 16.0), size=(28, 28)).clamp(0, 255)
    images = images[:, 0].numpy().astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:1500], True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", digits.target[:1500], True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[1500:], False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", digits.target[1500:], False)
    return tmp_path


def test_digits_split_is_fixed_and_shaped():
    train = load_dataset("digits", (3, 32, 32), "train")
    test = load_dataset("digits", (3, 32, 32), "test")
    assert (len(train), len(test)) == (1437, 360)
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    assert torch.equal(load_dataset("digits", (3, 32, 32), "test")[5][0], test[5][0])
    from dscompress.data.datasets import MEAN, STD

    raw = image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[1])  # grayscale repeated to 3 channels
    torch.testing.assert_close(raw[1], raw[2])
    assert train.classes == [str(i) for i in range(10)]


def test_mnist_idx_folder(idx_folder):
    train = load_dataset(f"mnist:{idx_folder}", (1, 28, 28), "train")
    test = load_dataset(f"mnist:{idx_folder}", (3, 16, 16), "test")
    assert (len(train), len(test)) == (1500, 297)
    assert train[0][0].shape == (1, 28, 28) and test[0][0].shape == (3, 16, 16)
    assert len(train.classes) == 10


def test_idx_reads_as_torchvision_does(idx_folder):
    """read_idx against torchvision's IDX readers (plain files), and .gz read as the plain file."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images, labels = str(idx_folder / "t10k-images-idx3-ubyte"), str(idx_folder / "t10k-labels-idx1-ubyte")
    assert torch.equal(torch.from_numpy(read_idx(images).copy()), read_image_file(images))
    assert torch.equal(torch.from_numpy(read_idx(labels).astype(np.int64)), read_label_file(labels))
    with open(images, "rb") as f:
        (idx_folder / "copy-idx3-ubyte.gz").write_bytes(gzip.compress(f.read()))
    assert np.array_equal(read_idx(str(idx_folder / "copy-idx3-ubyte.gz")), read_idx(images))
    test = load_dataset(f"mnist:{idx_folder}", (3, 16, 16), "test")
    expected = shape_images(read_image_file(images)[:, None].float() / 255.0, (3, 16, 16))
    assert torch.equal(torch.stack([test[i][0] for i in range(len(test))]), expected)
    assert [test[i][1] for i in range(len(test))] == read_label_file(labels).tolist()


def test_truncated_idx_is_reported(idx_folder):
    path = idx_folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DscompressError, match="truncated"):
        read_idx(str(path))


CIFAR_FILES = {  # kind: folder, training batches, test batch, (meta file, its key), label key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", ("batches.meta", "label_names"), "labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", ("meta", "fine_label_names"), "fine_labels"),
}


def write_cifar(root, kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random CIFAR python batches (4 images each) under ``root``; returns the images (N, 3, 32, 32)
    and labels of each split in the order of its batches."""
    import pickle

    folder, train_files, test_file, (meta, key), label_key = CIFAR_FILES[kind]
    (root / folder).mkdir()
    rng = np.random.default_rng(0)
    classes = 10 if kind == "cifar10" else 100
    written = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        parts = []
        for name in files:
            data, labels = rng.integers(0, 256, (4, 3072), dtype=np.uint8), rng.integers(0, classes, 4)
            pickle.dump({"data": data, label_key: labels.tolist()}, open(root / folder / name, "wb"))
            parts.append((data.reshape(-1, 3, 32, 32), labels))
        written[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    pickle.dump({key: [f"c{i}" for i in range(classes)]}, open(root / folder / meta, "wb"))
    return written


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_batches_are_read_in_order_and_shaped(kind, tmp_path):
    written = write_cifar(tmp_path, kind)
    folder = tmp_path / CIFAR_FILES[kind][0]
    for split, root in (("train", tmp_path), ("test", folder)):  # DIR may be the batches' folder or the one holding it
        data = load_dataset(f"{kind}:{root}", (3, 40, 40), split)
        images, labels = written[split]
        assert len(data) == len(labels) and data.classes == [f"c{i}" for i in range(len(data.classes))]
        expected = shape_images(torch.from_numpy(images).float() / 255.0, (3, 40, 40))
        assert torch.equal(torch.stack([data[i][0] for i in range(len(data))]), expected)
        assert [data[i][1] for i in range(len(data))] == labels.tolist()


@pytest.mark.parametrize("missing", ["data_batch_3", "batches.meta"])
def test_cifar_missing_file_is_named(missing, tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / missing).unlink()
    with pytest.raises(DscompressError, match=f"cifar10: .*{missing}"):
        load_dataset(f"cifar10:{tmp_path}", (3, 32, 32), "train")


def test_voc_reads_as_torchvision_does(tmp_path):
    """The voc reader against torchvision's VOCSegmentation on the standard layout, image by image."""
    from PIL import Image
    from torchvision.datasets import VOCSegmentation
    from torchvision.transforms.functional import pil_to_tensor

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, stems in (("train", ["b", "a", "c"]), ("val", ["d"])):
        for stem in stems:
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{stem}.jpg")
            mask = rng.choice([0, 3, 15, 255], (20, 30)).astype(np.uint8)
            Image.fromarray(mask).convert("P").save(voc / "SegmentationClass" / f"{stem}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    for split, image_set in (("train", "train"), ("test", "val")):
        ours = load_dataset(f"voc:{voc}", (3, 40, 60), split)
        reference = VOCSegmentation(str(tmp_path), image_set=image_set, download=False)
        assert len(ours) == len(reference)
        for (image, mask), (pil, target) in zip(ours, reference):
            assert torch.equal(image, shape_images(pil_to_tensor(pil)[None].float() / 255.0, (3, 40, 60))[0])
            assert torch.equal(mask, shape_mask(torch.from_numpy(np.array(target)), 40, 60))


def test_imagefolder(tmp_path):
    from PIL import Image

    digits = load_digits()
    for split in ("train", "val"):
        for i in range(6):
            folder = tmp_path / split / f"digit{digits.target[i] % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[i] * 16).astype(np.uint8)).save(folder / f"{i}.png")
    test = load_dataset(f"imagefolder:{tmp_path}", (3, 24, 24), "test")
    assert test.classes == ["digit0", "digit1"] and test[0][0].shape == (3, 24, 24)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("imagenet:/data", "'imagenet:/data'"),
        ("mnist", "mnist needs a folder"),
        ("digits:/x", "digits .*takes no folder"),
        ("mnist:/nonexistent", "'/nonexistent'"),
        ("cifar10:{tmp}", "cifar-10-batches-py/"),
        ("imagefolder:{tmp}", "train/"),
        ("mnist:{tmp}", "has no train-images-idx3-ubyte"),
    ],
)
def test_bad_specs(spec, message, tmp_path):
    with pytest.raises(DscompressError, match=message):
        load_dataset(spec.format(tmp=tmp_path), (3, 32, 32), "train")


def test_class_count_must_match_head():
    data = load_dataset("digits", (3, 16, 16), "test")
    check_classes(data, 10)
    with pytest.raises(DscompressError, match="10 classes.*7 outputs"):
        check_classes(data, 7)
    with pytest.raises(DscompressError, match="classification data.*segmentation model"):
        check_classes(data, 10, "digits", task="segmentation", model_name="seg")


def test_loader_order_is_seeded():
    data = load_dataset("digits", (3, 8, 8), "train")
    first = [labels.tolist() for _, labels in make_loader(data, 64, shuffle=True, seed=3)]
    again = [labels.tolist() for _, labels in make_loader(data, 64, shuffle=True, seed=3)]
    other = [labels.tolist() for _, labels in make_loader(data, 64, shuffle=True, seed=4)]
    assert first == again and first != other


def test_spec_parsing():
    assert DataSpec.parse("digits") == DataSpec("digits")
    assert str(DataSpec.parse("mnist:/data/fashion")) == "mnist:/data/fashion"
