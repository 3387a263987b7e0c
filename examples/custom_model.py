"""A model of your own through dscompress: named as ``custom_model:make_net``.

Any importable ``package.module:factory`` works wherever a torchvision name does. The factory
takes ``num_classes`` (so ``--num-classes`` works) and returns an ``nn.Module``.

    cd examples
    dscompress convert custom_model:make_net --num-classes 10 --input-size 3,32,32 -o net-ds
    dscompress run custom_model.yaml -o ../runs/custom      # baseline, convert, calibrate, distil, export
"""

from torch import nn


class SmallNet(nn.Module):
    """Four 3x3 conv blocks and a linear head: (N, 3, H, W) -> (N, num_classes)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, width, 1), block(width, width, 1), block(width, 2 * width, 2), block(2 * width, 2 * width, 2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def make_net(num_classes: int = 10) -> SmallNet:
    return SmallNet(num_classes)
