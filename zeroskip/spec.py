"""LayerSpec: one validated, frozen descriptor of a convolution operator.

A spec covers every argument of ``torch.nn.Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` plus the
two backward operators of a convolution. Every operator is described through one *associated
convolution* (``x -> y``, weight ``(C_y, C_x / groups, *kernel)``), whose per-axis geometry
(:class:`Axis`) the compiler reads:

=================  ===================================  ===============================
op                 computes                             fields describe
=================  ===================================  ===============================
conv               y = conv(x, w)                       the conv itself
conv_transpose     x_t -> y_t (torch's ConvTranspose)   torch's ConvTranspose arguments
conv_grad_input    dL/dx from dL/dy                     the forward conv
conv_grad_weight   dL/dw from x and dL/dy               the forward conv
=================  ===================================  ===============================

A transposed convolution is the ``conv_grad_input`` of the convolution that maps its output
back to its input, so its associated conv has ``in = out_channels``, ``out = in_channels`` and
input size = the transposed conv's output size.

Errors. Building a spec (``conv``, ``conv_transpose``, ``LayerSpec(...)``, ``from_dict``,
``dataclasses.replace``) raises only these, each naming the field; where torch has an
equivalent mistake, the exception type is the one torch raises for it:

* ``TypeError``: a value of the wrong type: a field that takes ints given a bool, a float, a
  string, None or a nested list; ``bias`` not a bool; an unknown ``dtype``.
* ``ValueError``: a value torch's module constructors reject (``groups``, channels, a
  ``padding_mode`` or ``padding`` string outside the fixed set, 'same' with a stride), a tuple of
  the wrong length, an unknown ``op``/``activation``/field; a :class:`Workload`'s ``density``
  not a finite number in [0, 1]; and :class:`LimitError` (a ``ValueError``) for a valid spec beyond the kernels' limits
  (below), which ``zeroskip.functional`` answers by running torch's op.
* ``RuntimeError``: geometry torch's forward rejects: negative padding, size (or batch, of a
  :class:`Workload`),
  non-positive stride, dilation or kernel size, a kernel larger than the padded input, an output
  size below 1.

Nothing else escapes (never OverflowError: Python ints do not overflow, a float that does is a
ValueError). A spec holds only plain built-ins: every int is a plain ``int`` (an int subclass or
numpy int is converted with ``operator.index``, never formatted), every enum field is the
canonical string constant of its fixed tuple (a ``str`` subclass cannot survive), ``bias`` a
``bool`` (and a workload's ``density`` a finite ``float``). So no field reaches generated source except as a
validated integer or an enum from a fixed set.

Limits (:class:`LimitError`): the generated C and Triton code indexes with 32-bit ints, so every
channel count, per-axis size, padded size, output size, kernel extent, padding and
output_padding must be at most ``MAX_INDEX`` (2**30: half of int32, headroom for the loops' last
step and tile offsets), and so must the elements per channel of the data, the output and the
kernel, and the packed weights; a workload's ``batch`` and the element count of every tensor at
most 2**63 - 1 (the batch is a run-time int64 argument of the kernels). ``stride`` and ``dilation``
must be at most ``MAX_STEP`` (1024): the compiler splits a transposed conv into one region per
stride phase and a dilated kernel into its holes, work that grows with them (a stride of 2**30
took minutes to compile before this limit).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .fields import (_choice, _density, _fmt, _int, _int_tuple, _ints, _jsonable, _pairs,
                     _rank_of, _show, normalize_padding)

OPS = ("conv", "conv_transpose", "conv_grad_input", "conv_grad_weight")
# Each op's two operands, named as in ``LayerSpec.input_shapes()``: the data operand first.
OPERANDS = {"conv": ("input", "weight"), "conv_transpose": ("input", "weight"),
            "conv_grad_input": ("grad_output", "weight"),
            "conv_grad_weight": ("input", "grad_output")}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
ACTIVATIONS = ("none", "relu")
DTYPES = ("float32", "float64", "float16", "bfloat16")
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16"}
MAX_INDEX = 2 ** 30        # the kernels index in 32-bit ints; 2x headroom for loop steps
MAX_ELEMENTS = 2 ** 63 - 1
MAX_STEP = 1024            # stride and dilation: compile work grows with them


class LimitError(ValueError):
    """A valid spec beyond the kernels' limits (see the module docstring): torch's op serves it."""


@dataclass(frozen=True)
class Axis:
    """Geometry of one spatial axis of the associated convolution ``x -> y``.

    ``x`` has ``size`` elements, is padded by ``pad_lo``/``pad_hi`` and read by ``kernel`` taps
    spaced ``dilation`` apart at every ``stride``-th position; ``y`` has ``out_size`` elements.
    Output ``o`` and tap ``k`` read ``x[o * stride - pad_lo + k * dilation]``.
    """

    size: int
    kernel: int
    stride: int
    dilation: int
    pad_lo: int
    pad_hi: int
    out_size: int

    @property
    def extent(self) -> int:
        """Span of the dilated kernel, holes included."""
        return self.dilation * (self.kernel - 1) + 1

    @property
    def padded_size(self) -> int:
        return self.size + self.pad_lo + self.pad_hi


def _normalize_dtype(dtype: Any) -> str:
    """The constant of :data:`DTYPES` naming ``dtype`` (a name, an alias, a ``torch.dtype``)."""
    if dtype is None:
        return DTYPES[0]
    try:   # only the plain text of the name counts: the constant of DTYPES is kept
        name = str.__str__(dtype if isinstance(dtype, str) else str(dtype))
    except Exception:
        raise TypeError(f"dtype must be one of {DTYPES}, got a {type(dtype).__name__}") \
            from None
    name = name.removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    try:
        return _choice(name, DTYPES, "dtype")
    except ValueError:
        raise TypeError(f"dtype must be one of {DTYPES}, got {_show(dtype)}") from None


@dataclass(frozen=True)
class LayerSpec:
    """A frozen, validated convolution operator; build it with :meth:`conv` or
    :meth:`conv_transpose`, derive backward operators with :meth:`grad_input` and
    :meth:`grad_weight`."""

    op: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    output_padding: tuple[int, ...]
    padding_mode: str
    bias: bool
    input_size: tuple[int, ...]
    dtype: str = "float32"
    activation: str = "none"   # 'relu': the output goes through a fused ReLU epilogue

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def conv(cls, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
             dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
             dtype=None, *, input_size, activation: str = "none") -> "LayerSpec":
        """Mirrors ``torch.nn.ConvNd(in_channels, out_channels, kernel_size, stride, padding,
        dilation, groups, bias, padding_mode, device, dtype)``; ``input_size`` is the spatial size
        of the input (its length sets the rank), ``activation='relu'`` fuses a ReLU into the
        output. The batch size and the input's density are not the layer's: see
        :class:`Workload`."""
        rank = _rank_of(input_size, kernel_size, stride, padding, dilation)
        if not 1 <= rank <= 3:
            raise ValueError(f"input_size must have 1 to 3 spatial dimensions, got {rank}")
        kernel = _ints(kernel_size, rank, "kernel_size")
        stride_t = _ints(stride, rank, "stride")
        dilation_t = _ints(dilation, rank, "dilation")
        return cls(op="conv", in_channels=in_channels, out_channels=out_channels,
                   kernel_size=kernel, stride=stride_t,
                   padding=normalize_padding(padding, kernel, dilation_t, stride_t),
                   dilation=dilation_t, groups=groups, output_padding=(0,) * rank,
                   padding_mode=padding_mode, bias=bias,
                   input_size=_ints(input_size, rank, "input_size"),
                   dtype=_normalize_dtype(dtype), activation=activation)

    @classmethod
    def conv_transpose(cls, in_channels: int, out_channels: int, kernel_size, stride=1,
                       padding=0, output_padding=0, groups: int = 1, bias: bool = True,
                       dilation=1, padding_mode: str = "zeros", dtype=None, *, input_size,
                       activation: str = "none") -> "LayerSpec":
        """Mirrors ``torch.nn.ConvTransposeNd(in_channels, out_channels, kernel_size, stride,
        padding, output_padding, groups, bias, dilation, padding_mode, device, dtype)``."""
        rank = _rank_of(input_size, kernel_size, stride, padding, output_padding, dilation)
        if not 1 <= rank <= 3:
            raise ValueError(f"input_size must have 1 to 3 spatial dimensions, got {rank}")
        if isinstance(padding, str):
            raise TypeError(f"padding={padding!r} is not supported for transposed convolutions; "
                             "padding must be an int or a tuple of ints")
        pad = _ints(padding, rank, "padding")
        return cls(op="conv_transpose", in_channels=in_channels, out_channels=out_channels,
                   kernel_size=_ints(kernel_size, rank, "kernel_size"),
                   stride=_ints(stride, rank, "stride"), padding=tuple((p, p) for p in pad),
                   dilation=_ints(dilation, rank, "dilation"), groups=groups,
                   output_padding=_ints(output_padding, rank, "output_padding"),
                   padding_mode=padding_mode, bias=bias,
                   input_size=_ints(input_size, rank, "input_size"),
                   dtype=_normalize_dtype(dtype), activation=activation)

    # ----------------------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        # Every field is replaced by a plain built-in first (the module docstring), so what
        # the checks below see is what the compiler and the templates read.
        def put(field: str, value: Any) -> None:
            object.__setattr__(self, field, value)

        put("op", _choice(self.op, OPS, "op"))
        kernel = _int_tuple(self.kernel_size, "kernel_size")
        rank = len(kernel)
        if not 1 <= rank <= 3:
            raise ValueError(f"kernel_size must have 1 to 3 spatial dimensions, got {rank}")
        put("kernel_size", kernel)
        for field in ("in_channels", "out_channels", "groups"):
            put(field, _int(getattr(self, field), field))
        for field in ("stride", "dilation", "output_padding", "input_size"):
            value = _int_tuple(getattr(self, field), field)
            if len(value) != rank:
                raise ValueError(f"{field} must be {rank} ints, got {value!r}")
            put(field, value)
        put("padding", _pairs(self.padding, rank))
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be a bool, got {type(self.bias).__name__} "
                            f"{_show(self.bias)}")
        put("bias", True if self.bias else False)
        put("dtype", _normalize_dtype(self.dtype))
        put("padding_mode", _choice(self.padding_mode, PADDING_MODES, "padding_mode"))
        put("activation", _choice(self.activation, ACTIVATIONS, "activation"))
        self._check_values()
        self._check_limits()

    def _check_values(self) -> None:
        # The order and exception types follow torch: module construction raises ValueError,
        # the convolution itself raises RuntimeError.
        if self.groups <= 0:
            raise ValueError(f"groups must be a positive integer, got groups={self.groups}")
        if self.in_channels <= 0 or self.out_channels <= 0:
            raise ValueError("in_channels and out_channels must be positive, got "
                             f"in_channels={self.in_channels}, out_channels={self.out_channels}")
        if self.in_channels % self.groups:
            raise ValueError(f"in_channels must be divisible by groups "
                             f"(in_channels={self.in_channels}, groups={self.groups})")
        if self.out_channels % self.groups:
            raise ValueError(f"out_channels must be divisible by groups "
                             f"(out_channels={self.out_channels}, groups={self.groups})")
        if self.op == "conv_transpose" and self.padding_mode != "zeros":
            raise ValueError('Only "zeros" padding mode is supported for transposed convolutions, '
                             f"got padding_mode={self.padding_mode!r}")
        if self.activation != "none" and self.op not in ("conv", "conv_transpose"):
            raise ValueError(f"activation={self.activation!r} applies to conv and "
                             f"conv_transpose, not to {self.op!r}")
        if any(k <= 0 for k in self.kernel_size):
            raise RuntimeError(f"kernel_size must be positive, got kernel_size={self.kernel_size}")
        if any(s <= 0 for s in self.stride):
            raise RuntimeError(f"non-positive stride is not supported (stride={self.stride})")
        if any(d <= 0 for d in self.dilation):
            raise RuntimeError(f"dilation should be greater than zero (dilation={self.dilation})")
        if any(p < 0 for pair in self.padding for p in pair):
            raise RuntimeError(f"negative padding is not supported (padding={self.padding})")
        if any(n < 0 for n in self.input_size):
            raise RuntimeError(f"input_size must be non-negative, got input_size={self.input_size}")
        if self.op == "conv_transpose":
            if self.padding_mode != "zeros" or any(lo != hi for lo, hi in self.padding):
                raise ValueError(f"padding must be symmetric for transposed convolutions, "
                                 f"got padding={self.padding}")
            if any(op < 0 for op in self.output_padding):
                raise RuntimeError(f"negative output_padding is not supported "
                                   f"(output_padding={self.output_padding})")
            if any(op >= max(s, d) for op, s, d in
                   zip(self.output_padding, self.stride, self.dilation)):
                raise RuntimeError(
                    "output padding must be smaller than either stride or dilation, but got "
                    f"output_padding={self.output_padding}, stride={self.stride}, "
                    f"dilation={self.dilation}")
            if any(n <= 0 for n in self.input_size):
                raise RuntimeError(f"input_size must be positive, got input_size={self.input_size}")
            out = self._transpose_output_size()
            if any(n <= 0 for n in out):
                raise RuntimeError(f"Given input_size={self.input_size}, the calculated output "
                                   f"size {out} is too small (check padding={self.padding})")
        else:
            if any(self.output_padding):
                raise ValueError(f"output_padding applies to transposed convolutions only, "
                                 f"got output_padding={self.output_padding} for op={self.op!r}")
            padded = tuple(n + lo + hi for n, (lo, hi) in zip(self.input_size, self.padding))
            extent = tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))
            if any(p < e for p, e in zip(padded, extent)):
                raise RuntimeError(
                    f"Calculated padded input size per channel: {padded}. Kernel size: {extent}. "
                    "Kernel size can't be greater than actual input size "
                    f"(input_size={self.input_size}, kernel_size={self.kernel_size}, "
                    f"dilation={self.dilation}, padding={self.padding})")
            if self.padding_mode in ("reflect", "replicate", "circular"):
                # Reflect needs pad < size, circular pad <= size, replicate a non-empty size
                # even with an empty batch (torch.nn.functional.pad).
                limit = {"reflect": lambda pad, n: pad < n,
                         "replicate": lambda pad, n: n > 0,
                         "circular": lambda pad, n: pad <= n}[self.padding_mode]
                if not all(limit(p, n) for pair, n in zip(self.padding, self.input_size)
                           for p in pair):
                    raise RuntimeError(
                        f"padding={self.padding} does not fit padding_mode="
                        f"{self.padding_mode!r} on input_size={self.input_size} (reflect: "
                        "padding < size, circular: padding <= size, replicate: size >= 1)")

    def _check_limits(self) -> None:
        """:class:`LimitError` for a valid spec the kernels cannot index (module docstring)."""
        def check(what: str, values, limit: int = MAX_INDEX) -> None:
            values = tuple(values)
            if any(v > limit for v in values):
                raise LimitError(f"{what} {values if len(values) > 1 else values[0]} exceeds "
                                 f"the kernels' limit {limit}: zeroskip's kernels do not "
                                 f"serve this layer ({self.op}, in_channels="
                                 f"{self.in_channels}, out_channels={self.out_channels}, "
                                 f"kernel_size={self.kernel_size}, input_size="
                                 f"{self.input_size})")

        check("stride", self.stride, MAX_STEP)
        check("dilation", self.dilation, MAX_STEP)
        for field in ("in_channels", "out_channels", "groups"):
            check(field, (getattr(self, field),))
        for field in ("kernel_size", "input_size", "output_padding"):
            check(field, getattr(self, field))
        check("padding", (p for pair in self.padding for p in pair))
        axes = self.axes
        check("padded input size", (a.padded_size for a in axes))
        check("kernel extent", (a.extent for a in axes))
        check("size", (a.size for a in axes))
        check("output size", (a.out_size for a in axes))
        check("elements per channel", (math.prod(a.padded_size for a in axes),
                                       math.prod(a.out_size for a in axes),
                                       math.prod(self.kernel_size)))
        c_x, c_y = self.conv_channels
        c_red, c_out = c_x // self.groups, c_y // self.groups
        # Packed weights: [g][c_red][tap][c_out rounded up to whole register tiles] + bias.
        check("packed weight elements", (self.groups * -(-c_out // 64) * 64 *
                                         (c_red * math.prod(self.kernel_size) + 1),))
        check("tensor elements", (math.prod(shape) for shape in
                                  (*self.input_shapes().values(), self.output_shape())),
              MAX_ELEMENTS)

    def _transpose_output_size(self) -> tuple[int, ...]:
        return tuple((n - 1) * s - lo - hi + d * (k - 1) + op + 1 for n, s, (lo, hi), d, k, op in
                     zip(self.input_size, self.stride, self.padding, self.dilation,
                         self.kernel_size, self.output_padding))

    # ----------------------------------------------------------------------------- shapes
    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    @property
    def output_size(self) -> tuple[int, ...]:
        """Spatial size of what the operator returns (for conv_grad_weight: the kernel size)."""
        if self.op == "conv":
            return tuple(a.out_size for a in self.axes)
        if self.op == "conv_transpose":
            return self._transpose_output_size()
        if self.op == "conv_grad_input":
            return self.input_size
        return self.kernel_size

    @property
    def axes(self) -> tuple[Axis, ...]:
        """Per-axis geometry of the associated convolution (see the module docstring)."""
        if self.op == "conv_transpose":
            sizes = self._transpose_output_size()
            return tuple(Axis(size=y, kernel=k, stride=s, dilation=d, pad_lo=lo, pad_hi=hi,
                              out_size=x)
                         for y, x, k, s, d, (lo, hi) in zip(sizes, self.input_size,
                                                             self.kernel_size, self.stride,
                                                             self.dilation, self.padding))
        axes = []
        for n, k, s, d, (lo, hi) in zip(self.input_size, self.kernel_size, self.stride,
                                        self.dilation, self.padding):
            out = (n + lo + hi - d * (k - 1) - 1) // s + 1
            axes.append(Axis(size=n, kernel=k, stride=s, dilation=d, pad_lo=lo, pad_hi=hi,
                             out_size=out))
        return tuple(axes)

    @property
    def conv_channels(self) -> tuple[int, int]:
        """``(C_x, C_y)``: input and output channels of the associated convolution."""
        if self.op == "conv_transpose":
            return self.out_channels, self.in_channels
        return self.in_channels, self.out_channels

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """torch's weight layout: ``(out, in / groups, *k)``, or ``(in, out / groups, *k)`` for a
        transposed conv; in both cases ``(C_y, C_x / groups, *k)`` of the associated conv."""
        c_x, c_y = self.conv_channels
        return (c_y, c_x // self.groups, *self.kernel_size)

    def input_shapes(self, batch: int = 1) -> dict[str, tuple[int, ...]]:
        """Shapes of the operator's tensor operands at ``batch``, by name."""
        c_x, c_y = self.conv_channels
        x_shape = (batch, c_x, *(a.size for a in self.axes))
        y_shape = (batch, c_y, *(a.out_size for a in self.axes))
        if self.op == "conv":
            shapes = {"input": x_shape, "weight": self.weight_shape}
        elif self.op == "conv_transpose":
            shapes = {"input": y_shape, "weight": self.weight_shape}
        elif self.op == "conv_grad_input":
            shapes = {"grad_output": y_shape, "weight": self.weight_shape}
        else:
            shapes = {"input": x_shape, "grad_output": y_shape}
        if self.bias and self.op in ("conv", "conv_transpose"):
            shapes["bias"] = (self.out_channels,)
        return shapes

    def output_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape of what the operator returns at ``batch`` (the weight gradient has none)."""
        if self.op == "conv_grad_weight":
            return self.weight_shape
        channels = self.in_channels if self.op == "conv_grad_input" else self.out_channels
        return (batch, channels, *self.output_size)

    @property
    def torch_name(self) -> str:
        """The torch.nn.functional name of the operator (or of its forward op for gradients)."""
        base = "conv_transpose" if self.op == "conv_transpose" else "conv"
        name = f"{base}{self.rank}d"
        return {"conv_grad_input": f"{name}.grad_input",
                "conv_grad_weight": f"{name}.grad_weight"}.get(self.op, name)

    # ----------------------------------------------------------------------------- backward ops
    def grad_input(self) -> "LayerSpec":
        """The operator computing the gradient w.r.t. this operator's input.

        For a conv it is ``conv_grad_input`` of the same conv (a transposed convolution); for a
        transposed conv it is an ordinary ``conv`` of its output gradient.
        """
        if self.op == "conv":
            return dataclasses.replace(self, op="conv_grad_input", bias=False,
                                       activation="none")
        if self.op == "conv_transpose":
            c_x, c_y = self.conv_channels
            # output_padding >= stride (allowed when dilation > stride) leaves trailing outputs
            # no input reaches: pad_hi shrinks so the conv yields exactly input_size outputs,
            # and where it would go negative the conv reads a cropped output gradient
            # (gradient_crop) instead.
            crop = self.gradient_crop
            padding = tuple((lo, max(0, hi - (op - s + 1))) for (lo, hi), op, s in
                            zip(self.padding, self.output_padding, self.stride))
            size = tuple(n - c for n, c in zip(self._transpose_output_size(), crop))
            return LayerSpec(op="conv", in_channels=c_x, out_channels=c_y,
                             kernel_size=self.kernel_size, stride=self.stride,
                             padding=padding, dilation=self.dilation, groups=self.groups,
                             output_padding=(0,) * self.rank, padding_mode="zeros", bias=False,
                             input_size=size, dtype=self.dtype)
        raise ValueError(f"grad_input() is defined for 'conv' and 'conv_transpose', not {self.op!r}")

    @property
    def gradient_crop(self) -> tuple[int, ...]:
        """Per axis, how many trailing elements of a transposed conv's output gradient its
        gradient operators do not read (zeros for every other operator).

        An output_padding >= stride + padding (allowed when dilation > stride) appends
        ``output_padding - padding`` outputs that no input reaches; the gradient operators
        (a conv over the output gradient, and its weight gradient) skip the last
        ``output_padding - stride + 1 - padding`` of them, exactly: those elements meet no
        input and no weight."""
        if self.op != "conv_transpose":
            return (0,) * self.rank
        return tuple(max(0, op - s + 1 - hi) for (_, hi), op, s in
                     zip(self.padding, self.output_padding, self.stride))

    def grad_weight(self) -> "LayerSpec":
        """The operator computing the gradient w.r.t. the weight: ``conv_grad_weight`` of the
        associated conv. For a transposed conv its ``input`` operand is the gradient of the
        transposed conv's output and its ``grad_output`` operand the transposed conv's input."""
        if self.op == "conv":
            return dataclasses.replace(self, op="conv_grad_weight", bias=False,
                                       activation="none")
        if self.op == "conv_transpose":
            forward = self.grad_input()
            return dataclasses.replace(forward, op="conv_grad_weight")
        raise ValueError(f"grad_weight() is defined for 'conv' and 'conv_transpose', "
                         f"not {self.op!r}")

    # ----------------------------------------------------------------------------- display
    def describe(self, batch: int | str | None = None) -> str:
        """One line naming the operator and its arguments, e.g. for generated-file headers: on
        its input size, with the batch in front where ``batch`` is given."""
        parts = [f"{self.torch_name}({self.in_channels}->{self.out_channels}",
                 f"k={_fmt(self.kernel_size)}"]
        if any(s != 1 for s in self.stride):
            parts.append(f"s={_fmt(self.stride)}")
        if any(any(p) for p in self.padding):
            sym = all(lo == hi for lo, hi in self.padding)
            parts.append("p=" + (_fmt(tuple(lo for lo, _ in self.padding)) if sym
                                 else str(self.padding).replace(" ", "")))
        if any(d != 1 for d in self.dilation):
            parts.append(f"d={_fmt(self.dilation)}")
        if any(self.output_padding):
            parts.append(f"op={_fmt(self.output_padding)}")
        if self.groups != 1:
            parts.append(f"g={self.groups}")
        if self.padding_mode != "zeros":
            parts.append(f"mode={self.padding_mode}")
        if self.dtype != "float32":
            parts.append(self.dtype)
        text = ", ".join(parts) + ")"
        if self.activation != "none":
            text += f"+{self.activation}"
        return text + " on " + "x".join(map(str, ((batch,) if batch is not None else ()) +
                                             self.input_size))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown LayerSpec fields: {sorted(unknown)}")
        kwargs = dict(data)
        for name in ("kernel_size", "stride", "dilation", "output_padding", "input_size"):
            if name in kwargs and isinstance(kwargs[name], list):
                kwargs[name] = tuple(kwargs[name])
        if isinstance(kwargs.get("padding"), list):
            kwargs["padding"] = tuple(tuple(p) if isinstance(p, list) else p
                                      for p in kwargs["padding"])
        return cls(**kwargs)


@dataclass(frozen=True)
class Workload:
    """What a layer runs on, beside its shape: the batch size, the expected share of non-zeros
    of its data operand (``density``) and, in training, of its output's gradient
    (``grad_density``: what its input gradient runs on; a ReLU after the layer masks it). A
    :class:`LayerSpec` is the compile key; a workload is what tracing measures, tuning times
    at and the dispatch decides on."""

    batch: int = 1
    density: float = 1.0
    grad_density: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch", _int(self.batch, "batch"))
        object.__setattr__(self, "density", _density(self.density))
        object.__setattr__(self, "grad_density", _density(self.grad_density, "grad_density"))
        if self.batch < 0:
            raise RuntimeError(f"batch must be non-negative, got batch={self.batch}")
        if self.batch > MAX_ELEMENTS:
            raise LimitError(f"batch {self.batch} exceeds the kernels' limit {MAX_ELEMENTS}")

    def check(self, spec: LayerSpec) -> "Workload":
        """Raise what torch raises for ``spec`` run at this batch (RuntimeError for a batch of
        empty inputs; :class:`LimitError` past the kernels' limits); return the workload."""
        if spec.op != "conv_transpose" and self.batch and not all(spec.input_size):
            raise RuntimeError("Only zero batch or zero channel inputs are supported, got "
                               f"batch={self.batch}, input_size={spec.input_size}")
        shapes = (*spec.input_shapes(self.batch).values(), spec.output_shape(self.batch))
        largest = max(math.prod(shape) for shape in shapes)
        if largest > MAX_ELEMENTS:
            raise LimitError(f"tensor elements {largest} exceed the kernels' limit "
                             f"{MAX_ELEMENTS}: zeroskip's kernels do not serve "
                             f"{spec.describe(self.batch)}")
        return self

    def describe(self) -> str:
        return f"batch {self.batch}" + (f", density {self.density:g}" if self.density < 1 else "")

    def to_dict(self) -> dict[str, Any]:
        found = {"batch": self.batch, "density": self.density}
        if self.grad_density < 1:
            found["grad_density"] = self.grad_density
        return found


DENSE = Workload()

__all__ = ["LayerSpec", "Workload", "DENSE", "Axis", "LimitError", "normalize_padding", "OPS", "PADDING_MODES",
           "DTYPES", "ACTIVATIONS", "MAX_INDEX", "MAX_STEP"]
