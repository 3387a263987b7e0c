"""What the tests share: toy models (each defined once here) and fixtures.

The toy models are importable as ``conftest:FACTORY`` (the tests folder is on ``sys.path``), which
is how the command line names them.
"""

import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Conditions some tests depend on, named in their skip reasons.
GPU = torch.cuda.is_available()
ORT_LISTS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()  # the onnxruntime-gpu wheel


def error_line(result, code: int = 2) -> str:
    """The one line a command prints when it stops, after checking that it is one: exit status
    ``code``, one line on stderr (warnings and notes aside), ``error:`` for bad input (2) or
    ``failed:`` for a check that failed (1), no traceback. Tests then check the key fact in it
    (the bad value, the option), not its wording."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith(("warning: ", "note: "))]
    assert len(lines) == 1 and lines[0].startswith("error: " if code == 2 else "failed: "), result.stderr
    return lines[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TinyNet(nn.Module):
    """A small CNN with the layer kinds conversion meets: stem, 3x3, strided 5x5, BN, head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 5, stride=2, padding=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def make_tiny(num_classes: int = 10) -> TinyNet:
    """A seeded TinyNet in eval mode."""
    torch.manual_seed(0)
    return TinyNet(num_classes).eval()


class SmallNet(nn.Module):
    """Three 3x3 conv blocks with BatchNorm, and dropout (so that resuming must restore the RNG)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.conv2(self.conv1(self.stem(x))))


def small_net(num_classes: int = 10) -> SmallNet:
    return SmallNet(num_classes)


class TinyCNN(nn.Module):
    """Five 3x3 convs (the last with a bias and no BatchNorm), pooled into a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, 16, 1),
            block(16, 32, 2),
            block(32, 32, 1),
            block(32, 64, 2),
            nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, bias=True), nn.ReLU()),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def large_kernel_net(padding: str = "explicit") -> nn.Module:
    """5x5 and 7x7 convs (``dilation="rf"`` targets) with explicit or ``"same"`` padding."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, padding=2 if padding == "explicit" else "same"),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 7, padding=3 if padding == "explicit" else "same"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.fixture
def tiny():
    model = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A user model importable as ``usermodels:make`` (what `package.module:factory` names)."""
    (tmp_path / "usermodels.py").write_text(
        "from torch import nn\n"
        "def make(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),\n"
        "                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
        "def not_a_model():\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "usermodels"


class TinySeg(nn.Module):
    """A DeepLab in miniature for segmentation tests: a strided stem, a dilated 3x3, two atrous
    branches concatenated (as in ASPP) and projected, a 1x1 classifier, bilinear upsampling to
    the input size. Returns logits (N, classes, H, W)."""

    def __init__(self, num_classes: int = 11):
        super().__init__()

        def block(cin, cout, kernel, dilation=1, stride=1):
            padding = dilation * (kernel // 2)
            return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = block(3, 8, 3, stride=2)
        self.body = block(8, 16, 3, dilation=2)
        self.atrous = block(16, 16, 3, dilation=3)
        self.pointwise = block(16, 16, 1)
        self.project = block(32, 16, 1)
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        features = self.body(self.stem(x))
        features = self.project(torch.cat([self.atrous(features), self.pointwise(features)], dim=1))
        return nn.functional.interpolate(self.classifier(features), size=size, mode="bilinear", align_corners=False)


def tiny_seg(num_classes: int = 11) -> TinySeg:
    """A seeded TinySeg in eval mode (name it as ``conftest:tiny_seg --task segmentation``)."""
    torch.manual_seed(0)
    return TinySeg(num_classes).eval()


class SharedAndFunctional(nn.Module):
    """Calls one conv twice and a functional conv once."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.kernel = nn.Parameter(torch.randn(8, 8, 3, 3))
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.unused = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        x = self.conv(self.conv(x))
        x = F.conv2d(x, self.kernel, padding=1)
        return self.depthwise(self.grouped(x))


class Untraceable(nn.Module):
    """One conv behind data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.conv(x)
