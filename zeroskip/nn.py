"""Drop-ins for torch's convolution modules: subclasses with the same constructor, parameters,
``state_dict`` and ``padding_mode``, whose forward runs on generated kernels."""
from __future__ import annotations

import torch

from .runtime.binding import convolution


class _Conv:
    _rank: int
    _activation = "none"
    _relu_input = False

    def _conv_forward(self, input, weight, bias):
        return convolution("conv", self._rank, input, weight, bias, self.stride, self.padding,
                           self.dilation, self.groups, 0, self.padding_mode, self._activation,
                           self._relu_input)


class _ConvTranspose:
    _rank: int

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError(f"Only 'zeros' padding mode is supported for "
                             f"{type(self).__name__}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, self._rank, self.dilation)
        return convolution("conv_transpose", self._rank, input, self.weight, self.bias,
                           self.stride, self.padding, self.dilation, self.groups, output_padding)


class Conv1d(_Conv, torch.nn.Conv1d):
    _rank = 1


class Conv2d(_Conv, torch.nn.Conv2d):
    _rank = 2


class Conv3d(_Conv, torch.nn.Conv3d):
    _rank = 3


class ConvReLU1d(Conv1d):
    """``Conv1d`` then ``ReLU``, fused: the ReLU is applied as the kernel stores results."""
    _activation = "relu"


class ConvReLU2d(Conv2d):
    """``Conv2d`` then ``ReLU``, fused: the ReLU is applied as the kernel stores results."""
    _activation = "relu"


class ConvReLU3d(Conv3d):
    """``Conv3d`` then ``ReLU``, fused: the ReLU is applied as the kernel stores results."""
    _activation = "relu"


class ReLUConv1d(Conv1d):
    """``ReLU`` then ``Conv1d``, fused: the conv skips the ReLU's zeros, and the backward
    returns the pre-activation's gradient (passed where it was positive)."""
    _relu_input = True


class ReLUConv2d(Conv2d):
    """``ReLU`` then ``Conv2d``, fused; see :class:`ReLUConv1d`."""
    _relu_input = True


class ReLUConv3d(Conv3d):
    """``ReLU`` then ``Conv3d``, fused; see :class:`ReLUConv1d`."""
    _relu_input = True


class ReLUConvReLU1d(Conv1d):
    """``ReLU``, ``Conv1d``, ``ReLU``: both ReLUs fused."""
    _relu_input, _activation = True, "relu"


class ReLUConvReLU2d(Conv2d):
    """``ReLU``, ``Conv2d``, ``ReLU``: both ReLUs fused."""
    _relu_input, _activation = True, "relu"


class ReLUConvReLU3d(Conv3d):
    """``ReLU``, ``Conv3d``, ``ReLU``: both ReLUs fused."""
    _relu_input, _activation = True, "relu"


class ConvTranspose1d(_ConvTranspose, torch.nn.ConvTranspose1d):
    _rank = 1


class ConvTranspose2d(_ConvTranspose, torch.nn.ConvTranspose2d):
    _rank = 2


class ConvTranspose3d(_ConvTranspose, torch.nn.ConvTranspose3d):
    _rank = 3


REPLACEMENTS = {torch.nn.Conv1d: Conv1d, torch.nn.Conv2d: Conv2d, torch.nn.Conv3d: Conv3d,
                torch.nn.ConvTranspose1d: ConvTranspose1d,
                torch.nn.ConvTranspose2d: ConvTranspose2d,
                torch.nn.ConvTranspose3d: ConvTranspose3d}

FUSED_RELU = {torch.nn.Conv1d: ConvReLU1d, torch.nn.Conv2d: ConvReLU2d,
              torch.nn.Conv3d: ConvReLU3d}
# (ReLU before, ReLU after) -> the class of a fused conv of each rank.
FUSED = {(False, False): (Conv1d, Conv2d, Conv3d),
         (False, True): (ConvReLU1d, ConvReLU2d, ConvReLU3d),
         (True, False): (ReLUConv1d, ReLUConv2d, ReLUConv3d),
         (True, True): (ReLUConvReLU1d, ReLUConvReLU2d, ReLUConvReLU3d)}

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
           "ConvTranspose3d", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d", "ReLUConv1d",
           "ReLUConv2d", "ReLUConv3d", "ReLUConvReLU1d", "ReLUConvReLU2d", "ReLUConvReLU3d"]
