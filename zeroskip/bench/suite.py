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
    wide: bool = False      # from the wide suite: real-model shapes the kernels were not tuned on


def _conv(name: str, family: str, *args, dense: bool = False, quick: bool = False,
          **kwargs) -> Layer:
    return Layer(name, family, LayerSpec.conv(*args, **kwargs), dense, quick)


def _deconv(name: str, family: str, *args, quick: bool = False, wide: bool = False,
            **kwargs) -> Layer:
    return Layer(name, family, LayerSpec.conv_transpose(*args, **kwargs), quick=quick,
                 wide=wide)


def _w(name: str, family: str, *args, **kwargs) -> Layer:
    """A conv of the wide suite (counted as dense where it is ungrouped and undilated)."""
    spec = LayerSpec.conv(*args, **kwargs)
    dense = spec.groups == 1 and set(spec.dilation) == {1}
    return Layer(name, family, spec, dense=dense, wide=True)


def _wt(name: str, family: str, *args, **kwargs) -> Layer:
    """A transposed conv of the wide suite."""
    return _deconv(name, family, *args, wide=True, **kwargs)


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

# The wide suite: layer shapes of other real models, with the channel counts (24, 40, 80, 96,
# 112, 144, 192, 320, ...), odd map sizes (147, 73, 35, 17, 8) and kernels (1x7, 5x5, 11x11
# transposed) the suite above does not have; ``zeroskip bench --suite wide`` runs them (at
# --batch 1 and 8 for the README). Layers without bias where the model has none.
WIDE: list[Layer] = [
    # MobileNetV2 (224x224): stem and the 1x1 expand/project convs of its inverted residuals.
    _w("mobilenetv2.stem", "mobilenetv2", 3, 32, 3, 2, 1, bias=False, input_size=(224, 224)),
    _w("mobilenetv2.b1.expand", "mobilenetv2", 16, 96, 1, bias=False, input_size=(112, 112)),
    _w("mobilenetv2.b2.project", "mobilenetv2", 144, 24, 1, bias=False, input_size=(56, 56)),
    _w("mobilenetv2.b3.expand", "mobilenetv2", 24, 144, 1, bias=False, input_size=(56, 56)),
    _w("mobilenetv2.b11.project", "mobilenetv2", 384, 96, 1, bias=False, input_size=(14, 14)),
    _w("mobilenetv2.b17.project", "mobilenetv2", 960, 320, 1, bias=False, input_size=(7, 7)),
    _w("mobilenetv2.head", "mobilenetv2", 320, 1280, 1, bias=False, input_size=(7, 7)),
    # MobileNetV3-Large: 5x5 depthwise stride 2, 1x1 convs with 40/80/112 channels.
    _w("mobilenetv3.b4.dw5-s2", "mobilenetv3", 72, 72, 5, 2, 2, groups=72, bias=False,
       input_size=(56, 56)),
    _w("mobilenetv3.b5.expand", "mobilenetv3", 40, 120, 1, bias=False, input_size=(28, 28)),
    _w("mobilenetv3.b8.expand", "mobilenetv3", 80, 200, 1, bias=False, input_size=(14, 14)),
    _w("mobilenetv3.b12.expand", "mobilenetv3", 112, 672, 1, bias=False, input_size=(14, 14)),
    # EfficientNet-B0: 1x1 convs around 5x5 depthwise ones.
    _w("efficientnet.b3.project", "efficientnet", 240, 40, 1, bias=False, input_size=(28, 28)),
    _w("efficientnet.b6.dw5", "efficientnet", 480, 480, 5, 1, 2, groups=480, bias=False,
       input_size=(14, 14)),
    _w("efficientnet.b11.project", "efficientnet", 672, 192, 1, bias=False,
       input_size=(7, 7)),
    _w("efficientnet.b15.expand", "efficientnet", 192, 1152, 1, bias=False,
       input_size=(7, 7)),
    # Inception-v3 (299x299): valid 3x3 on 147/73, 5x5 on 35, 1x7 and 7x1 on 17, 3x3 stride
    # 2 on 17 -> 8, 1x3 on 8.
    _w("inceptionv3.conv2a", "inceptionv3", 32, 32, 3, bias=False, input_size=(147, 147)),
    _w("inceptionv3.conv4a", "inceptionv3", 80, 192, 3, bias=False, input_size=(73, 73)),
    _w("inceptionv3.mixed5b.5x5", "inceptionv3", 48, 64, 5, 1, 2, bias=False,
       input_size=(35, 35)),
    _w("inceptionv3.mixed5b.3x3dbl", "inceptionv3", 64, 96, 3, 1, 1, bias=False,
       input_size=(35, 35)),
    _w("inceptionv3.mixed6b.1x7", "inceptionv3", 128, 128, (1, 7), 1, (0, 3), bias=False,
       input_size=(17, 17)),
    _w("inceptionv3.mixed6b.7x1", "inceptionv3", 128, 192, (7, 1), 1, (3, 0), bias=False,
       input_size=(17, 17)),
    _w("inceptionv3.mixed7a.3x3-s2", "inceptionv3", 192, 320, 3, 2, bias=False,
       input_size=(17, 17)),
    _w("inceptionv3.mixed7b.1x3", "inceptionv3", 384, 384, (1, 3), 1, (0, 1), bias=False,
       input_size=(8, 8)),
    # Odd sizes met in the wild: 96 channels on 40x40, a 1x1 on a 112x112 map, a strided
    # 128 -> 256 on 28x28.
    _w("odd.96ch-40x40", "odd", 96, 96, 3, 1, 1, input_size=(40, 40)),
    _w("odd.1x1-32to64-112", "odd", 32, 64, 1, input_size=(112, 112)),
    _w("odd.128to256-s2-28", "odd", 128, 256, 3, 2, 1, input_size=(28, 28)),
    # U-Net (256x256) decoder: the up-conv into the last stage and its 3x3 conv.
    _wt("unet.dec1.up", "unet", 128, 64, 2, 2, input_size=(64, 64)),
    _w("unet.dec1.conv", "unet", 128, 64, 3, 1, 1, input_size=(128, 128)),
    # Stable Diffusion's U-Net on a 32x32 latent (256x256 images): conv_in, a 640-channel
    # 3x3, the 1280-channel middle, a 1x1 skip projection, conv_out.
    _w("diffusion.conv_in", "diffusion", 4, 320, 3, 1, 1, input_size=(32, 32)),
    _w("diffusion.down2.conv", "diffusion", 640, 640, 3, 1, 1, input_size=(16, 16)),
    _w("diffusion.mid.conv", "diffusion", 1280, 1280, 3, 1, 1, input_size=(4, 4)),
    _w("diffusion.up1.skip", "diffusion", 960, 640, 1, input_size=(16, 16)),
    _w("diffusion.conv_out", "diffusion", 320, 4, 3, 1, 1, input_size=(32, 32)),
    # Transposed convs with few input positions: FCN's score upsampling (21 classes, x2 on a
    # 16x16 map, and FCN-32s's x32 one, k=64 s=32, 1024 stride phases, to 224x224), AlexNet's
    # and GoogLeNet's first layers inverted.
    _wt("fcn8s.upscore2", "fcn", 21, 21, 4, 2, bias=False, input_size=(16, 16)),
    _wt("fcn32s.upscore", "fcn", 21, 21, 64, 32, 16, bias=False, input_size=(7, 7)),
    _wt("alexnet.deconv1", "deconvnet", 96, 3, 11, 4, 2, 1, input_size=(55, 55)),
    _wt("googlenet.deconv1", "deconvnet", 64, 3, 7, 2, 3, 1, input_size=(112, 112)),
    # Dilated: ASPP rates 6 and 18 on 33x33 (as the main suite's rate 12, 512 channels in);
    # DeepSpeech2's first conv (DeepBench).
    _w("deeplab.aspp-r6", "dilated", 512, 256, 3, 1, 6, 6, bias=False, input_size=(33, 33)),
    _w("deeplab.aspp-r18", "dilated", 512, 256, 3, 1, 18, 18, bias=False,
       input_size=(33, 33)),
    _w("deepspeech2.conv1", "deepbench", 1, 32, (20, 5), 2, input_size=(161, 700)),
]

# A layer small enough that a call is all overhead.
TINY = LayerSpec.conv(4, 4, 3, 1, 1, input_size=(8, 8))


SUITES = ("main", "wide", "all")


def select(quick: bool = False, patterns: list[str] | None = None,
           suite: str = "main") -> list[Layer]:
    """The suite (``main``, the ``wide`` one or ``all``; ``quick``: the main suite's quick
    subset), keeping layers whose name or family contains one of ``patterns`` when given."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    pool = {"main": SUITE, "wide": WIDE, "all": SUITE + WIDE}[suite]
    layers = [layer for layer in pool if layer.quick or not quick]
    if patterns:
        layers = [layer for layer in layers
                  if any(p in layer.name or p in layer.family for p in patterns)]
    return layers


def wide_3x3(spec: LayerSpec) -> bool:
    """A 2-D 3x3 layer (ungrouped) with at least 64 channels in and out: the layers the speed
    goals for the sparse kernel are about."""
    return spec.kernel_size == (3, 3) and spec.groups == 1 and \
        min(spec.in_channels, spec.out_channels) >= 64


def strided_conv(spec: LayerSpec) -> bool:
    """The transposed case: a conv with a stride above 1, whose input gradient is a strided
    transposed convolution (``conv_grad_input``: zeros between the gradient's elements)."""
    return spec.op == "conv" and any(s > 1 for s in spec.stride)
