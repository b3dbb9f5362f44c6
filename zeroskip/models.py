"""Built-in networks: the default workload of ``zeroskip demo`` (and of examples and tests)."""
from __future__ import annotations

import torch
from torch import nn


def dcgan_generator(nz: int = 100, ngf: int = 64, channels: int = 3) -> nn.Sequential:
    """A DCGAN generator for 32x32 images: 1x1 -> 4x4 -> 8x8 -> 16x16 -> 32x32."""
    def up(cin: int, cout: int, stride: int = 2, padding: int = 1) -> list[nn.Module]:
        return [nn.ConvTranspose2d(cin, cout, 4, stride, padding, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*up(nz, ngf * 4, 1, 0), *up(ngf * 4, ngf * 2), *up(ngf * 2, ngf),
                         nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False), nn.Tanh())


class BasicBlock(nn.Module):
    """A ResNet basic block, with a strided 1x1 projection when it downsamples."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet_stage(cin: int = 64, cout: int = 128) -> nn.Sequential:
    """Two ResNet basic blocks, the first downsampling by 2."""
    return nn.Sequential(BasicBlock(cin, cout, 2), BasicBlock(cout, cout))


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet: a 3x3 stem (conv-BN-ReLU), then one stage of ``blocks`` basic
    blocks per width (each later stage downsampling by 2), global average pooling and a linear
    classifier."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256), blocks: int = 1,
                 classes: int = 10, channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if i and not j else 1))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def vgg_net(widths: tuple[int, ...] = (64, 128, 256), size: int = 32, classes: int = 10,
            channels: int = 3) -> nn.Sequential:
    """A VGG-style net of conv-ReLU pairs: two 3x3 convs per width, each width ending in a 2x2
    max-pool, then a linear classifier (for ``size`` x ``size`` inputs)."""
    layers, cin = [], channels
    for width in widths:
        for _ in range(2):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
            cin = width
        layers.append(nn.MaxPool2d(2))
    side = size >> len(widths)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, classes))


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze conv, then 1x1 and 3x3 expand convs whose
    ReLU'd outputs are concatenated."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """torchvision's ``squeezenet1_1``: its layers, names and initialization (written out: the
    CUDA torchvision wheel does not load beside the CPU torch). ``stem`` and ``fires``
    ((squeeze, expand) channels per Fire, None for a ceil-mode 3x3 max-pool) make smaller
    ones."""

    V1_1 = ((16, 64), (16, 64), None, (32, 128), (32, 128), None, (48, 192), (48, 192),
            (64, 256), (64, 256))

    def __init__(self, num_classes: int = 1000, stem: int = 64,
                 fires: tuple[tuple[int, int] | None, ...] = V1_1):
        super().__init__()
        def pool() -> nn.Module:
            return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        layers: list[nn.Module] = [nn.Conv2d(3, stem, kernel_size=3, stride=2),
                                   nn.ReLU(inplace=True), pool()]
        cin = stem
        for fire in fires:
            if fire is None:
                layers.append(pool())
                continue
            squeeze, expand = fire
            layers.append(Fire(cin, squeeze, expand, expand))
            cin = 2 * expand
        self.features = nn.Sequential(*layers)
        final_conv = nn.Conv2d(cin, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.5), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def _torchvision_init(net: nn.Module) -> None:
    """torchvision's initialization of its ResNets and MobileNets: He-normal convs (fan out),
    BatchNorm at identity, small linear layers. (torch's defaults shrink the activations of a
    deep net toward zero, which would leave little for a check to compare.)"""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """torchvision's ``resnet18`` layout (written out, as :class:`SqueezeNet`): a 7x7 stride-2
    stem and a max-pool, four stages of ``blocks`` basic blocks (64-512 channels, each later
    stage downsampling by 2), global average pooling and a linear classifier. ``width``
    scales the channels (small ones for tests)."""

    def __init__(self, num_classes: int = 1000, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, count in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(count):
                layers.append(BasicBlock(cin, cout, 2 if i and not j else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.channels = cin
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(cin, num_classes))
        _torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: a 1x1 expansion, a 3x3 depthwise conv, a 1x1 projection (ReLU6
    between), with a residual where the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2`` layout (written out): inverted residual blocks with
    depthwise 3x3 convs; ``width`` divides the channels (small ones for tests)."""

    # (expansion, channels, blocks, stride of the first)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width: int = 1):
        super().__init__()
        cin = 32 // width
        layers: list[nn.Module] = [nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin),
                                   nn.ReLU6(inplace=True)]
        for expand, channels, count, stride in self.SETTINGS:
            for i in range(count):
                layers.append(InvertedResidual(cin, channels // width, stride if i == 0 else 1,
                                               expand))
                cin = channels // width
        last = 1280 // width
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last),
                   nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(last, num_classes))
        _torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FCN32s(nn.Module):
    """A segmentation network in FCN-32s's form: a :class:`ResNet` trunk (stride 32), a 1x1
    score layer per class and FCN-32s's transposed-conv upsampler (k=64, s=32, p=16) back to
    the input's size."""

    def __init__(self, classes: int = 21, width: int = 64):
        super().__init__()
        trunk = ResNet(width=width)
        self.trunk = nn.Sequential(trunk.stem, trunk.stages)
        self.score = nn.Conv2d(trunk.channels, classes, 1)
        self.upscore = nn.ConvTranspose2d(classes, classes, 64, 32, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upscore(self.score(self.trunk(x)))


def builtin_workload(seed: int = 0) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(name, model, sample input)`` for each built-in network, the input drawn like the
    activations the network sees in use (a latent vector; a post-ReLU feature map)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return [
        ("dcgan", dcgan_generator().eval(), torch.randn(8, 100, 1, 1, generator=gen)),
        ("resnet", resnet_stage().eval(), torch.relu(torch.randn(4, 64, 32, 32, generator=gen))),
    ]
