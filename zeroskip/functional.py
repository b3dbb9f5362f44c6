"""Drop-ins for ``torch.nn.functional``'s convolutions, with the same signatures, running on
generated kernels (see :func:`zeroskip.runtime.binding.convolution`)."""
from __future__ import annotations

from .runtime.binding import convolution


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return convolution("conv", 1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return convolution("conv", 2, input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return convolution("conv", 3, input, weight, bias, stride, padding, dilation, groups)


def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    return convolution("conv_transpose", 1, input, weight, bias, stride, padding, dilation,
                       groups, output_padding)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    return convolution("conv_transpose", 2, input, weight, bias, stride, padding, dilation,
                       groups, output_padding)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    return convolution("conv_transpose", 3, input, weight, bias, stride, padding, dilation,
                       groups, output_padding)


def conv1d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``relu(conv1d(...))`` in one kernel: the ReLU is applied as results are stored."""
    return convolution("conv", 1, input, weight, bias, stride, padding, dilation, groups,
                       activation="relu")


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``relu(conv2d(...))`` in one kernel: the ReLU is applied as results are stored."""
    return convolution("conv", 2, input, weight, bias, stride, padding, dilation, groups,
                       activation="relu")


def conv3d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``relu(conv3d(...))`` in one kernel: the ReLU is applied as results are stored."""
    return convolution("conv", 3, input, weight, bias, stride, padding, dilation, groups,
                       activation="relu")


def relu_conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``conv1d(relu(input), ...)``: the conv skips the ReLU's zeros (sparse kernels forward
    and in the weight gradient), and the backward returns ``input``'s gradient, passed only
    where ``input > 0``."""
    return convolution("conv", 1, input, weight, bias, stride, padding, dilation, groups,
                       relu_input=True)


def relu_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``conv2d(relu(input), ...)``; see :func:`relu_conv1d`."""
    return convolution("conv", 2, input, weight, bias, stride, padding, dilation, groups,
                       relu_input=True)


def relu_conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``conv3d(relu(input), ...)``; see :func:`relu_conv1d`."""
    return convolution("conv", 3, input, weight, bias, stride, padding, dilation, groups,
                       relu_input=True)


__all__ = ["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "conv1d_relu", "conv2d_relu", "conv3d_relu", "relu_conv1d",
           "relu_conv2d", "relu_conv3d"]
