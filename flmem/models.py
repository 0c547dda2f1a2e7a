"""Models, each built from a config group file (``conf/model/*.yaml``) by ``hydra.utils.instantiate``.

The image models take the dataset's ``in_channels``, ``num_classes`` and ``image_size`` so one
model config fits every image dataset (the config interpolates them from ``dataset``); the
language model takes ``vocab_size`` and ``seq_len`` from ``dataset=tokens``.
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


class DecoderLM(nn.Module):
    """A decoder-only transformer language model (GPT-style, pre-norm, causal self-attention).

    Size knobs: ``d_model``, ``n_layers``, ``n_heads``, ``d_ff`` (default 4 * d_model), ``vocab_size``.
    Parameters: about 12 * n_layers * d_model**2 + 2 * vocab_size * d_model + seq_len * d_model
    (e.g. d_model=2048, n_layers=13, vocab 8192: 688 M parameters, 2.56 GiB in float32).
    Input token ids ``[B, T]`` with T <= seq_len; output logits ``[B, T, vocab_size]``.
    """

    def __init__(self, vocab_size: int = 8192, seq_len: int = 64, d_model: int = 256, n_layers: int = 4,
                 n_heads: int = 4, d_ff: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff or 4 * d_model, dropout, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        h = self.blocks(h, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(h))
