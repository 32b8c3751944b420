"""Small hand-written models that exercise one analyzer feature each."""

import torch
import torch.nn.functional as F
from torch import nn


class ConvZoo(nn.Module):
    """One conv of every kind: standard, depthwise, grouped, pointwise, dilated, transposed, biased."""

    def __init__(self):
        super().__init__()
        self.standard = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.grouped = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4, bias=False)
        self.pointwise = nn.Conv2d(32, 32, 1, bias=True)
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False)
        self.up = nn.ConvTranspose2d(32, 8, 2, stride=2, bias=False)

    def forward(self, x):
        x = self.grouped(self.depthwise(self.standard(x)))
        return self.up(self.dilated(self.pointwise(x)))


class FunctionalConv(nn.Module):
    """A conv written with F.conv2d and registered parameters."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 3, 3, 3))
        self.bias = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight, self.bias, padding=1))


class SharedConv(nn.Module):
    """One conv module called at two sites: two rows, parameters counted once."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return self.conv(torch.relu(self.conv(x)))


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(x) * 2


class UntraceableInside(nn.Module):
    """A traceable model around an untraceable block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.gate(self.stem(x)))


class UntraceableRoot(nn.Module):
    """The top-level forward itself branches on data."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        if x.mean() > 0:
            x = self.b(x)
        return self.b(x)


class Convs1d3d(nn.Module):
    """Conv1d and Conv3d on the same model (two inputs)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, stride=2)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)

    def forward(self, seq, vol):
        return self.c1(seq).sum() + self.c3(vol).sum()


class NoConv(nn.Module):
    """An MLP: valid, with no convolution at all."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Attention(nn.Module):
    """Matrix products outside nn.Linear: matmul and scaled dot-product attention."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1)
        return F.scaled_dot_product_attention(q, k, v) + scores.sum()


class WithFFT(nn.Module):
    """An op with no cost handler (FFT): listed as unsupported, never counted as zero silently."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.fft.rfft2(self.conv(x)).abs()


class DataDependentShape(nn.Module):
    """Boolean masking: the output size depends on values, so meta tensors cannot give it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y[y > 0]


class OddWidths(nn.Module):
    """Residual stages of 100 and 250 channels, a concat of 60 + 40 into a BN, an SE-style gate, flatten into Linear."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 100, 3, padding=1, bias=False), nn.BatchNorm2d(100), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(100, 100, 3, padding=1), nn.BatchNorm2d(100), nn.ReLU(),
                                    nn.Conv2d(100, 100, 3, padding=1), nn.BatchNorm2d(100))
        self.left = nn.Conv2d(100, 60, 1)
        self.right = nn.Sequential(nn.Conv2d(100, 40, 3, padding=1), nn.PReLU(40))
        self.joined = nn.BatchNorm2d(100)
        self.down = nn.Sequential(nn.Conv2d(100, 250, 3, stride=2, padding=1), nn.BatchNorm2d(250))
        self.block2 = nn.Sequential(nn.Conv2d(250, 250, 3, padding=1, groups=250), nn.BatchNorm2d(250), nn.ReLU6(),
                                    nn.Conv2d(250, 250, 1))
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(250, 30, 1), nn.ReLU(), nn.Conv2d(30, 250, 1),
                                  nn.Sigmoid())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(250 * 4, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = F.relu(self.joined(torch.cat([self.left(x), self.right(x)], 1)))  # 60 + 40 channels
        x = self.down(x)
        x = x + self.block2(x)
        x = x * self.gate(x)
        return self.head(torch.flatten(self.pool(x), 1))


class ChannelMix(nn.Module):
    """A channel shuffle by view/transpose, which the channel graph must freeze, not guess."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 20, 3, padding=1)
        self.b = nn.Conv2d(20, 20, 3, padding=1)
        self.c = nn.Conv2d(20, 12, 3, padding=1)
        self.d = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.d(torch.relu(self.c(self.b(x))))


def fashion_resnet(width: int) -> nn.Module:
    """The ResNet-style Fashion-MNIST net of the examples (residual adds, strides, a 1×1 shortcut), seeded, in
    eval mode."""
    import sys

    sys.path.insert(0, "examples")
    try:
        from fashion_cnns import ResNetStyle
    finally:
        sys.path.remove("examples")
    torch.manual_seed(0)
    return ResNetStyle(width).eval()
