"""Two small CNNs for 28×28 grayscale images (Fashion-MNIST): a VGG-style and a ResNet-style one."""

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGStyle(nn.Module):
    """Three stages of two 3×3 convs (w, 2w, 4w channels) with max pooling, then a linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(*_cbr(1, w), *_cbr(w, w), nn.MaxPool2d(2),
                                      *_cbr(w, 2 * w), *_cbr(2 * w, 2 * w), nn.MaxPool2d(2),
                                      *_cbr(2 * w, 4 * w), *_cbr(4 * w, 4 * w))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class BasicBlock(nn.Module):
    """Two 3×3 convs and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetStyle(nn.Module):
    """A stem conv and five basic blocks (w, 2w, 2w, 4w, 4w channels), then a linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_cbr(1, w))
        self.blocks = nn.Sequential(BasicBlock(w, w), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w),
                                    BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


INPUT_SHAPE = (1, 1, 28, 28)
MODELS = {"vgg": VGGStyle, "resnet": ResNetStyle}


def build_model(kind: str = "resnet", width: int = 16) -> nn.Module:
    """``dsrewrite analyze examples/fashion_cnns.py --arg kind='vgg'``."""
    return MODELS[kind](width)
