"""Exit-head designs, in a registry. Each head maps a feature map [N, C, H, W] to logits
[N, num_classes] and is built with keyword-only ``in_channels`` and ``num_classes``; a head
with a hidden layer sets ``hidden = True`` and also takes ``hidden_channels``, its width:
``min(C, exits.head_width)`` for exit heads (a conv head on 2,048 channels would otherwise cost
more than a ResNet-50 stage), C for the final head.

Add your own with ``@HEADS.register("name")``; the name can then be used in a search space.

:func:`adaptive_max_pool2d_windows` writes adaptive max pooling as the fixed windows it is
(gather, max): ONNX has no adaptive max pooling to an output size that does not divide the
input (SDN's 4x4 from a 7x7 or 2x2 map), so the ONNX export decomposes
``aten.adaptive_max_pool2d`` with it. The heads keep torch's kernels (training speed, fvcore's
counts); torch's exporter already writes adaptive average pooling exactly at every size.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("head")


@HEADS.register("linear")
class LinearHead(nn.Module):
    """Global average pool + Linear."""

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


@HEADS.register("sdn_pool")
class SDNPoolHead(nn.Module):
    """SDN's mixed pooling: ``a * maxpool + (1 - a) * avgpool`` to 4x4, flatten, Linear, with a
    learnable mixing weight ``a = sigmoid(mix_logit)`` (0.5 at initialisation).

    ``a`` is kept in (0, 1) through the sigmoid: the unconstrained scalar of the SDN paper
    gathers gradient from every pooled element, left [0, 1] and blew the loss up to 1e5 at
    learning rate 0.1 in our CIFAR-10 retraining runs."""

    size = 4

    def __init__(self, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.mix_logit = nn.Parameter(torch.tensor(0.0))
        self.max_pool = nn.AdaptiveMaxPool2d(self.size)
        self.avg_pool = nn.AdaptiveAvgPool2d(self.size)
        self.fc = nn.Linear(in_channels * self.size * self.size, num_classes)

    @property
    def mix(self) -> torch.Tensor:
        return torch.sigmoid(self.mix_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.mix
        mixed = a * self.max_pool(x) + (1 - a) * self.avg_pool(x)
        return self.fc(torch.flatten(mixed, 1))


@HEADS.register("conv")
class ConvHead(nn.Module):
    """ZTW / MSDNet style: 3x3 conv-BN-ReLU to ``hidden_channels``, global average pool,
    Linear."""

    hidden = True

    def __init__(self, *, in_channels: int, num_classes: int, hidden_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(hidden_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@HEADS.register("mlp")
class MLPHead(nn.Module):
    """Global average pool + Linear(C, hidden)-ReLU-Linear(hidden, classes)."""

    hidden = True

    def __init__(self, *, in_channels: int, num_classes: int, hidden_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.flatten(self.pool(x), 1))


# ---- adaptive max pooling as fixed windows (for ONNX) ---------------------------------------
def _axis_windows(n: int, out: int, device) -> tuple[torch.Tensor, int]:
    """Adaptive pooling's windows along an axis of length ``n`` into ``out`` cells: cell i
    covers [floor(i*n/out), ceil((i+1)*n/out)); windows overlap when ``out`` does not divide
    ``n`` and repeat when n < out. Returns their [out, k] positions (k = the longest window;
    shorter ones repeat their last position) and k."""
    k = max(-(-(i + 1) * n // out) - i * n // out for i in range(out))
    i = torch.arange(out, device=device)
    start = (i * n) // out
    last = ((i + 1) * n + out - 1) // out - 1
    pos = torch.minimum(start.unsqueeze(1) + torch.arange(k, device=device), last.unsqueeze(1))
    return pos, k


def adaptive_max_pool2d_windows(x: torch.Tensor, output_size) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.adaptive_max_pool2d(x, output_size, return_indices=True)`` written with ops ONNX
    has: max pooling when the output divides the input, else a gather of every output cell's
    window (row-major) and a max over it. The same values bit for bit and the same flat indices
    h*W + w (a padded position repeats one before it, so the first maximum is a real one).
    H and W must be static, as they are in exported graphs (only the batch is dynamic)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    oh, ow = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    oh, ow = int(h if oh is None else oh), int(w if ow is None else ow)
    if h % oh == 0 and w % ow == 0:
        return F.max_pool2d(x, (h // oh, w // ow), return_indices=True)
    rows, kh = _axis_windows(h, oh, x.device)
    cols, kw = _axis_windows(w, ow, x.device)
    flat = (rows[:, None, :, None] * w + cols[None, :, None, :]).reshape(oh * ow, kh * kw)
    cells = x.flatten(-2).index_select(-1, flat.flatten()).unflatten(-1, (oh * ow, kh * kw))
    values, arg = cells.max(-1)
    indices = flat.expand(*cells.shape).gather(-1, arg.unsqueeze(-1)).squeeze(-1)
    return values.unflatten(-1, (oh, ow)), indices.unflatten(-1, (oh, ow))


def build_head(name: str, *, in_channels: int, num_classes: int,
               pre_channels: int | None = None, max_hidden: int | None = None) -> nn.Module:
    """Build head ``name``; ``pre_channels`` puts a 1x1 conv-BN-ReLU6 in front (MobileNetV2's
    last layer before its classifier); a head with a hidden layer gets ``min(C, max_hidden)``
    hidden channels (C without ``max_hidden``)."""
    cls = HEADS.get(name)
    cin = pre_channels or in_channels
    extra = {"hidden_channels": min(cin, max_hidden or cin)} if getattr(cls, "hidden", False) else {}
    head = cls(in_channels=cin, num_classes=num_classes, **extra)
    if pre_channels is None:
        return head
    pre = nn.Sequential(nn.Conv2d(in_channels, pre_channels, 1, bias=False),
                        nn.BatchNorm2d(pre_channels), nn.ReLU6(inplace=True))
    return nn.Sequential(pre, head)
