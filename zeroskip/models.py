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


def builtin_workload(seed: int = 0) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(name, model, sample input)`` for each built-in network, the input drawn like the
    activations the network sees in use (a latent vector; a post-ReLU feature map)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return [
        ("dcgan", dcgan_generator().eval(), torch.randn(8, 100, 1, 1, generator=gen)),
        ("resnet", resnet_stage().eval(), torch.relu(torch.randn(4, 64, 32, 32, generator=gen))),
    ]
