"""ResNet-18 and AlexNet image classifiers, written to export cleanly to ONNX and CrypTen.

The architectures follow torchvision's ``resnet18`` and ``alexnet`` layer for layer (same
parameter names and counts: 11,689,512 and 61,100,840 at 1000 classes), because the
encrypted-inference paper benchmarks exactly these two networks. torchvision itself cannot
be installed beside our CPU torch, hence this module.

Two details keep the exported graph inside what ``crypten.nn.from_onnx`` understands:

* ResNet's adaptive average pool to 1x1 is written as ``nn.AdaptiveAvgPool2d(1)``, which the
  TorchScript ONNX exporter emits as ``GlobalAveragePool``.
* AlexNet's adaptive pool to 6x6 is resolved from the (static) input size at trace time:
  nothing when the map is already 6x6 (224x224 inputs), a fixed ``AveragePool`` when the size
  divides evenly, otherwise a constant pooling matrix (``MatMul``) that equals PyTorch's
  adaptive average pooling exactly.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "AlexNet", "resnet18", "alexnet", "ARCHITECTURES", "build_vision_model",
           "conv_batchnorm_pairs", "fold_batchnorm"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-compatible ResNet built from :class:`BasicBlock` stages."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # exported as GlobalAveragePool
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _adaptive_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) averaging matrix with PyTorch's adaptive-pool bin edges.

    Built with numpy so that ONNX tracing records it as one constant, not as ops.
    """
    m = np.zeros((size_out, size_in), dtype=np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


class FixedAdaptiveAvgPool2d(nn.Module):
    """Adaptive average pooling whose ONNX export uses only CrypTen-supported operators."""

    def __init__(self, output_size: tuple[int, int]):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        oh, ow = self.output_size
        if (h, w) == (oh, ow):
            return x
        if h % oh == 0 and w % ow == 0:
            return nn.functional.avg_pool2d(x, kernel_size=(h // oh, w // ow))
        # out[n, c] = P_h @ x[n, c] @ P_w^T, done as one MatMul over the flattened map.
        pool = np.kron(_adaptive_matrix(h, oh), _adaptive_matrix(w, ow)).T  # (h*w, oh*ow)
        pool_t = torch.from_numpy(np.ascontiguousarray(pool)).to(dtype=x.dtype, device=x.device)
        n, c = int(x.shape[0]), int(x.shape[1])  # static sizes: no Shape ops in the graph
        return torch.matmul(x.reshape(n, c, h * w), pool_t).reshape(n, c, oh, ow)


class AlexNet(nn.Module):
    """torchvision-compatible AlexNet (Krizhevsky et al., 2012, one-tower variant)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = FixedAdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=False),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-18 (11.69M parameters at 1000 classes and 3 input channels)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


def alexnet(num_classes: int = 1000, in_channels: int = 3) -> AlexNet:
    """AlexNet (61.1M parameters at 1000 classes and 3 input channels)."""
    return AlexNet(num_classes=num_classes, in_channels=in_channels)


#: Architecture name -> constructor taking ``num_classes`` and ``in_channels``.
ARCHITECTURES = {"resnet18": resnet18, "alexnet": alexnet}


def build_vision_model(arch: str, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """Construct an image model by name (``resnet18`` or ``alexnet``)."""
    try:
        ctor = ARCHITECTURES[arch]
    except KeyError as err:
        raise ValueError(f"unknown image architecture {arch!r}; choose from {sorted(ARCHITECTURES)}") from err
    return ctor(num_classes=num_classes, in_channels=in_channels)


def conv_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names where the BatchNorm normalises that convolution's output.

    In these architectures every ``BatchNorm2d`` is registered right after the ``Conv2d``
    whose output it takes (``conv1``/``bn1``, ``downsample.0``/``downsample.1``), so the
    pairs follow from registration order; any other BatchNorm is refused.
    """
    pairs, previous = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            if not isinstance(previous[1] if previous else None, nn.Conv2d):
                raise ValueError(f"BatchNorm {name!r} does not follow a convolution")
            pairs.append((previous[0], name))
        if not list(module.children()):
            previous = (name, module)
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with each BatchNorm folded into its convolution.

    Eval-mode BatchNorm is the affine map ``y = a * (x - mean) + beta`` with
    ``a = gamma / sqrt(var + eps)``, so ``BN(conv(x))`` equals a convolution with weight
    ``W * a`` (per output channel) and bias ``beta + a * (b - mean)``; the BatchNorm is
    replaced by ``nn.Identity``. The function is unchanged up to float rounding. With random
    (uninitialised) weights the result still has the folded *structure* and parameter names
    (``conv.bias`` added, the BatchNorm's gone), which is what an ONNX export for shared
    weights needs.
    """
    folded = copy.deepcopy(model).eval()
    modules = dict(folded.named_modules())
    for conv_name, bn_name in conv_batchnorm_pairs(folded):
        conv, bn = modules[conv_name], modules[bn_name]
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
            conv.bias = nn.Parameter(bn.bias + scale * (bias - bn.running_mean))
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else folded, attr, nn.Identity())
    return folded
