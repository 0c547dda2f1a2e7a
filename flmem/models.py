"""Models, each built from a config group file (``conf/model/*.yaml``) by ``hydra.utils.instantiate``.

Every constructor takes the dataset's ``in_channels``, ``num_classes`` and ``image_size`` so one
model config fits every dataset (the config interpolates them from ``dataset``).
"""
from __future__ import annotations

import torch
from torch import nn
import torchvision


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers (about 0.6 M parameters at 32x32, 2.4 MB in float32).

    Input ``[B, in_channels, image_size, image_size]``, output logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 width: int = 32, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """torchvision's ResNet-18 adapted to small images (the usual CIFAR variant).

    The 7x7 stride-2 stem becomes a 3x3 stride-1 convolution over ``in_channels`` and the stem's
    max-pool is dropped, so 32x32 (or 28x28) inputs keep enough resolution; the classifier has
    ``num_classes`` outputs. About 11.2 M parameters (44.7 MB in float32) for CIFAR-10.
    """
    del image_size  # the adaptive average pool makes the network size-agnostic
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
