"""ResNet-18 / AlexNet definitions: torchvision-compatible sizes and CrypTen-friendly ONNX."""
from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch

from protocols.vision import FixedAdaptiveAvgPool2d, alexnet, build_vision_model, resnet18

torch.set_num_threads(1)

#: Operators crypten.nn.from_onnx turns into modules (Identity is stripped by the compat layer).
CRYPTEN_OPS = {
    "Add", "BatchNormalization", "Constant", "Conv", "Flatten", "Gemm", "GlobalAveragePool",
    "AveragePool", "MatMul", "MaxPool", "Relu", "Reshape", "Identity", "Dropout",
}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_torchvision():
    assert _n_params(resnet18()) == 11_689_512
    assert _n_params(alexnet()) == 61_100_840


def test_state_dict_names_follow_torchvision():
    names = set(resnet18().state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer4.1.bn2.weight", "layer2.0.downsample.0.weight", "fc.bias"} <= names
    assert {"features.0.weight", "classifier.6.bias"} <= set(alexnet().state_dict())


@pytest.mark.parametrize(
    ("arch", "shape"), [("resnet18", (2, 1, 32, 32)), ("alexnet", (2, 1, 64, 64)), ("alexnet", (1, 3, 224, 224))]
)
def test_output_shapes(arch, shape):
    model = build_vision_model(arch, num_classes=3, in_channels=shape[1]).eval()
    with torch.no_grad():
        assert model(torch.randn(*shape)).shape == (shape[0], 3)


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (5, 7), (12, 12), (13, 6), (6, 6)])
def test_fixed_adaptive_pool_equals_torch(size):
    x = torch.randn(2, 4, *size)
    expected = torch.nn.AdaptiveAvgPool2d((6, 6))(x)
    torch.testing.assert_close(FixedAdaptiveAvgPool2d((6, 6))(x), expected)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown image architecture"):
        build_vision_model("vgg")


@pytest.mark.parametrize(("ctor", "side"), [(resnet18, 32), (alexnet, 64)])
def test_onnx_export_uses_only_crypten_operators(ctor, side):
    model = ctor(num_classes=3, in_channels=1).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 1, side, side),), buf, dynamo=False, opset_version=17)
    ops = {node.op_type for node in onnx.load_model_from_string(buf.getvalue()).graph.node}
    assert ops <= CRYPTEN_OPS, ops - CRYPTEN_OPS
    assert "GlobalAveragePool" in ops or "MatMul" in ops
