"""A user-style CNN with the channel counts people actually write: 100, 120, 250.

    dsrewrite analyze examples/odd_widths.py --groups       # which widths must change together
    dsrewrite convert examples/odd_widths.py --align 8 -o aligned.pt
    dsrewrite convert examples/odd_widths.py --width 0.75 -o slim.pt
"""

import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """Two 3×3 convs and an identity shortcut."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(_cbr(width, width), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class Mixed(nn.Module):
    """Two branches (120 + 130 channels) concatenated, then a BN over the concatenation."""

    def __init__(self, cin: int):
        super().__init__()
        self.a = _cbr(cin, 120, 1)
        self.b = nn.Sequential(_cbr(cin, 90, 1), _cbr(90, 130, 3))
        self.bn = nn.BatchNorm2d(250)

    def forward(self, x):
        return torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))


class OddWidths(nn.Module):
    """Stem 3→50 (stride 2), a 100-channel residual stage, a mixed block, a 250-channel residual stage."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(_cbr(3, 50, 3, 2), nn.MaxPool2d(2))
        self.stage1 = nn.Sequential(_cbr(50, 100), Residual(100), Residual(100))
        self.mixed = nn.Sequential(nn.MaxPool2d(2), Mixed(100))
        self.stage2 = nn.Sequential(Residual(250), Residual(250), nn.MaxPool2d(2), Residual(250))
        self.head = nn.Linear(250, num_classes)

    def forward(self, x):
        x = self.stage2(self.mixed(self.stage1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


INPUT_SHAPE = (1, 3, 224, 224)


def build_model() -> nn.Module:
    """The model ``dsrewrite`` loads from this file."""
    return OddWidths()
