"""The benchmark suite: real layer shapes of common networks, and what picks among them."""
from __future__ import annotations

from dataclasses import dataclass

from ..spec import LayerSpec


@dataclass(frozen=True)
class Layer:
    """One benchmark layer: ``name`` is ``<network>.<layer>``; ``dense`` marks an ordinary dense
    conv (counted in the dense geomean); ``quick`` puts it in the quick subset."""

    name: str
    family: str
    spec: LayerSpec
    dense: bool = False
    quick: bool = False


def _conv(name: str, family: str, *args, dense: bool = False, quick: bool = False,
          **kwargs) -> Layer:
    return Layer(name, family, LayerSpec.conv(*args, **kwargs), dense, quick)


def _deconv(name: str, family: str, *args, quick: bool = False, **kwargs) -> Layer:
    return Layer(name, family, LayerSpec.conv_transpose(*args, **kwargs), quick=quick)


# Real layer shapes at batch 1 (ImageNet 224x224 inputs unless noted).
SUITE: list[Layer] = [
    _conv("resnet18.conv1", "resnet18", 3, 64, 7, 2, 3, bias=False, input_size=(224, 224),
          dense=True),
    _conv("resnet18.layer1.conv", "resnet18", 64, 64, 3, 1, 1, bias=False,
          input_size=(56, 56), dense=True),
    _conv("resnet18.layer2.down", "resnet18", 64, 128, 3, 2, 1, bias=False,
          input_size=(56, 56), dense=True),
    _conv("resnet18.layer4.proj", "resnet18", 256, 512, 1, 2, bias=False,
          input_size=(14, 14), dense=True, quick=True),
    _conv("resnet50.layer1.reduce", "resnet50", 256, 64, 1, bias=False, input_size=(56, 56),
          dense=True),
    _conv("resnet50.layer3.conv2", "resnet50", 256, 256, 3, 1, 1, bias=False,
          input_size=(14, 14), dense=True),
    _conv("resnet50.layer4.expand", "resnet50", 512, 2048, 1, bias=False, input_size=(7, 7),
          dense=True),
    _conv("vgg16.conv2_1", "vgg16", 64, 128, 3, 1, 1, input_size=(112, 112), dense=True),
    _conv("vgg16.conv5_2", "vgg16", 512, 512, 3, 1, 1, input_size=(14, 14), dense=True),
    _conv("mobilenetv2.block2.dw", "mobilenetv2-dw", 144, 144, 3, 1, 1, groups=144,
          bias=False, input_size=(56, 56)),
    _conv("mobilenetv2.block3.dw-s2", "mobilenetv2-dw", 144, 144, 3, 2, 1, groups=144,
          bias=False, input_size=(56, 56), quick=True),
    _conv("mobilenetv2.block14.dw", "mobilenetv2-dw", 960, 960, 3, 1, 1, groups=960,
          bias=False, input_size=(7, 7)),
    # DCGAN generator for 64x64 images: 4x4 -> 8x8, and the last layer 32x32 -> 64x64.
    _deconv("dcgan.up2", "dcgan", 512, 256, 4, 2, 1, bias=False, input_size=(4, 4),
            quick=True),
    _deconv("dcgan.out", "dcgan", 64, 3, 4, 2, 1, bias=False, input_size=(32, 32)),
    # U-Net decoder on 128x128 images: the 2x2 up-conv out of the bottleneck, and a 3x3 one
    # (output_padding 1) as many decoders use.
    _deconv("unet.up1", "unet-dec", 1024, 512, 2, 2, input_size=(8, 8)),
    _deconv("unet.up3-k3", "unet-dec", 256, 128, 3, 2, 1, 1, input_size=(16, 16)),
    # Non-causal WaveNet residual convs (Parallel WaveGAN) on 4000 samples, dilation 1 to 512.
    _conv("wavenet.d1", "wavenet", 64, 128, 3, 1, 1, 1, input_size=(4000,)),
    _conv("wavenet.d16", "wavenet", 64, 128, 3, 1, 16, 16, input_size=(4000,), quick=True),
    _conv("wavenet.d512", "wavenet", 64, 128, 3, 1, 512, 512, input_size=(4000,)),
    # DeepLabv3 ASPP branch, rate 12, on the 33x33 output-stride-16 map of a 513x513 image.
    _conv("deeplab.aspp-r12", "deeplab", 512, 256, 3, 1, 12, 12, bias=False,
          input_size=(33, 33)),
    # 3-D U-Net decoder up-conv on a 16^3 feature volume.
    _deconv("unet3d.up", "unet3d", 128, 64, 2, 2, input_size=(16, 16, 16)),
    _deconv("convT1d-long", "convT1d-long", 64, 32, 4, 2, 1, input_size=(40000,), quick=True),
]

# A layer small enough that a call is all overhead.
TINY = LayerSpec.conv(4, 4, 3, 1, 1, input_size=(8, 8))


def select(quick: bool = False, patterns: list[str] | None = None) -> list[Layer]:
    """The suite (or its quick subset), keeping layers whose name or family contains one of
    ``patterns`` when given."""
    layers = [layer for layer in SUITE if layer.quick or not quick]
    if patterns:
        layers = [layer for layer in layers
                  if any(p in layer.name or p in layer.family for p in patterns)]
    return layers


def wide_3x3(spec: LayerSpec) -> bool:
    """A 2-D 3x3 layer (ungrouped) with at least 64 channels in and out: the layers the issue's
    goals for the sparse kernel are about."""
    return spec.kernel_size == (3, 3) and spec.groups == 1 and \
        min(spec.in_channels, spec.out_channels) >= 64


def strided_conv(spec: LayerSpec) -> bool:
    """The transposed case: a conv with a stride above 1, whose input gradient is a strided
    transposed convolution (``conv_grad_input``: zeros between the gradient's elements)."""
    return spec.op == "conv" and any(s > 1 for s in spec.stride)
