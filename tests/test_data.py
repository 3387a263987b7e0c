import gzip

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from dscompress.core.errors import DscompressError
from dscompress.data.datasets import DataSpec, check_classes, load_dataset, make_loader, read_idx


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


def test_truncated_idx_is_reported(idx_folder):
    path = idx_folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DscompressError, match="truncated"):
        read_idx(str(path))


def test_cifar_batches(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 4))}
        pickle.dump(batch, open(folder / name, "wb"))
    pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, open(folder / "batches.meta", "wb"))
    train = load_dataset(f"cifar10:{tmp_path}", (3, 40, 40), "train")
    assert len(train) == 20 and train[0][0].shape == (3, 40, 40)
    assert len(load_dataset(f"cifar10:{folder}", (3, 32, 32), "test")) == 4


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


def test_class_count_must_match_head(tiny):
    data = load_dataset("digits", (3, 16, 16), "test")
    check_classes(data, tiny, (3, 16, 16))
    tiny.fc = torch.nn.Linear(16, 7)
    with pytest.raises(DscompressError, match="10 classes.*7 outputs"):
        check_classes(data, tiny, (3, 16, 16))


def test_loader_order_is_seeded():
    data = load_dataset("digits", (3, 8, 8), "train")
    first = [labels.tolist() for _, labels in make_loader(data, 64, shuffle=True, seed=3)]
    again = [labels.tolist() for _, labels in make_loader(data, 64, shuffle=True, seed=3)]
    other = [labels.tolist() for _, labels in make_loader(data, 64, shuffle=True, seed=4)]
    assert first == again and first != other


def test_spec_parsing():
    assert DataSpec.parse("digits") == DataSpec("digits")
    assert str(DataSpec.parse("mnist:/data/fashion")) == "mnist:/data/fashion"
