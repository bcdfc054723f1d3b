"""ResNet-18 / AlexNet definitions: torchvision-compatible sizes and CrypTen-friendly ONNX."""
from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch

from protocols.vision import (FixedAdaptiveAvgPool2d, alexnet, build_vision_model, conv_batchnorm_pairs,
                             fold_batchnorm, resnet18)

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


def _trained_like_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm statistics like a trained net's (variances 0.05..25, means, affine)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                n = mod.num_features
                mod.running_var.copy_(torch.exp(torch.empty(n).uniform_(-3.0, 3.2, generator=gen)))
                mod.running_mean.copy_(torch.randn(n, generator=gen))
                mod.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.3)
    return model.eval()


def test_resnet_batchnorm_pairs_are_every_conv_and_its_norm():
    pairs = conv_batchnorm_pairs(resnet18())
    assert len(pairs) == 20  # 17 convs in blocks/stem + 3 downsample convs, each with its BatchNorm
    assert ("conv1", "bn1") in pairs and ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    assert conv_batchnorm_pairs(alexnet()) == []


@pytest.mark.parametrize(("ctor", "side"), [(resnet18, 32), (alexnet, 64)])
def test_folding_batchnorm_keeps_the_function(ctor, side):
    model = _trained_like_batchnorm(ctor(num_classes=3, in_channels=1))
    x = torch.randn(3, 1, side, side, generator=torch.Generator().manual_seed(1))
    folded = fold_batchnorm(model)
    with torch.no_grad():
        ref, got = model(x), folded(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == (ctor is resnet18)  # original untouched


def test_folded_resnet_exports_without_batchnorm():
    folded = fold_batchnorm(resnet18(num_classes=3, in_channels=1))
    assert "conv1.bias" in folded.state_dict() and "bn1.running_var" not in folded.state_dict()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(folded.eval(), (torch.randn(1, 1, 32, 32),), buf, dynamo=False, opset_version=17,
                          do_constant_folding=False)
    graph = onnx.load_model_from_string(buf.getvalue()).graph
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    # equal initial biases are de-duplicated by torch into Identity nodes named after the parameter
    names = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Identity"}
    assert {"conv1.weight", "conv1.bias", "layer4.1.conv2.bias"} <= names
