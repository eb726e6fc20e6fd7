"""Encoders (small CNN, ResNet-18/50 with an optional CIFAR stem) and the projector MLP."""
from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor, nn

from .catalog import ENCODERS  # noqa: F401  (re-exported)


class SmallCNN(nn.Module):
    """Three conv blocks and global average pooling; for 8x8 digits and 28x28 MNIST.

    Output: features h of shape (B, width * 4).
    """

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            *block(in_channels, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 4*width)
        )
        self.out_dim = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def resnet(name: str, in_channels: int = 3, cifar_stem: bool = True) -> nn.Module:
    """torchvision ResNet without its classifier; ``out_dim`` = 512 (18) or 2048 (50).

    ``cifar_stem`` replaces the 7x7 stride-2 conv and the max-pool by a 3x3
    stride-1 conv, the usual choice for 32x32 inputs (SimCLR's CIFAR setting).
    """
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def projector(dims: Sequence[int]) -> nn.Sequential:
    """MLP ``dims[0] -> ... -> dims[-1]`` with BN + ReLU between layers, none after the last."""
    layers = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=last))
        if not last:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SSLModel(nn.Module):
    """Encoder f and projector g: ``h = f(x)`` (B, D_h), ``z = g(h)`` (B, D_z)."""

    def __init__(self, encoder: nn.Module, proj: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = proj

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        h = self.encoder(x)
        return h, self.projector(h)


def build_model(encoder: str, in_channels: int, *, proj_hidden: int, proj_dim: int,
                cifar_stem: bool = True, width: int = 32) -> SSLModel:
    """Encoder by name plus a projector ``D_h -> proj_hidden -> proj_dim``."""
    if encoder == "small_cnn":
        enc = SmallCNN(in_channels, width=width)
    elif encoder in ("resnet18", "resnet50"):
        enc = resnet(encoder, in_channels, cifar_stem=cifar_stem)
    else:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    return SSLModel(enc, projector([enc.out_dim, proj_hidden, proj_dim]))
