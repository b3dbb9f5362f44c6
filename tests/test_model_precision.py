"""Float32 agreement on a whole model: a small SqueezeNet's gradients on generated kernels are as
close to float64 truth as torch's own float32 gradients are.

The model is torchvision's ``squeezenet1_1`` in miniature (no torchvision needed): Fire modules
(a 1x1 squeeze conv + ReLU, then 1x1 and 3x3 expand convs + ReLU concatenated), max-pools with
``ceil_mode=True`` whose last windows are partial here, two Fires with the same expand shapes
(one kernel serves both layers), and torchvision's classifier (Dropout, a 1x1 conv initialized
``normal(0, 0.01)``, ReLU, AdaptiveAvgPool), trained in train mode.

Why the precondition. A ReLU, and a max-pool's choice of element, is a discontinuity in the
gradient: where a pre-activation (or the gap between a window's two largest values) is within
float32 rounding of zero, any float32 computation, torch's included, may land on the other side
and move the gradient by ~1e-2 of its largest element, which then says nothing about the
kernels. On the full squeezenet1_1 (batch 4 of 3x96x96, 160 input seeds) torch's float32
gradients did so for 16 seeds (per-tensor errors 1e-3 to 1.4e-2) and zeroskip's for 21 (1e-3 to
3.8e-2), 7 of them the same seeds; in the 7 seeds examined, one ReLU'd element 0.9-3.5 units
of ``u * sum|w x|`` from zero (u = 2**-24) or one max-pool window whose two largest values were
1-7e-7 apart (relative) had flipped. (Zeroskip's kernels sum each output in one sequential
FMA chain, torch's GEMMs in several partial sums: zeroskip's float32 rounding is ~1.4x
torch's, so it flips a little more often.) So the test first checks, in float64, that no
pre-activation and no max-pool choice of this model is within 64 such units of a flip, and
then compares the gradients: an error beyond the bound is then the kernels'.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zeroskip
from zeroskip.models import SqueezeNet

U = 2.0 ** -24            # float32's unit roundoff
MARGIN_UNITS = 64         # precondition: no ReLU or max-pool within this many roundings of a flip
# Absolute floor of the bound, relative to the largest gradient: 8 units of float32 rounding.
# On this model torch's own float32 error is below one unit (4.8e-8 measured, u = 6e-8) by luck
# of its summation order, zeroskip's 1.6e-7 (2.6 u): 2x torch's alone would ask for agreement
# finer than one rounding of the largest gradient. The gradients' reductions run over up to 800
# terms (the first conv's weight gradient: 2 x 20 x 20 positions), whose sequential sum may
# stray by tens of units; the bound still fails a kernel error of 1e-5 (a weight gradient 1e-5
# off in one layer measures 1e-5 against a per-parameter bound of 2e-6).
FLOOR = 8 * U


def tiny_squeezenet() -> nn.Module:
    """squeezenet1_1's structure, narrower and shallower (two Fires of one size, so the compile
    stays short); torchvision's initialization."""
    return SqueezeNet(num_classes=10, stem=16, fires=((8, 16), (8, 16), None))


MODEL_SEED, INPUT_SEED, DROPOUT_SEED = 1, 7, 2   # chosen for the precondition (775 units)
BATCH, SIZE = 2, 42       # 42 -> 20 -> 10 -> 5: both ceil-mode pools end in a partial window


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(MODEL_SEED)
    model = tiny_squeezenet().train()
    torch.manual_seed(INPUT_SEED)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    target = torch.randint(0, 5, (BATCH,))
    return model, x, target


def step(model: nn.Module, dtype: torch.dtype, x: torch.Tensor, target: torch.Tensor,
         record: bool = False):
    """One training step's gradients (float64 copies), the RNG state after the forward (the
    dropout mask drawn), and, with ``record``, each conv's output (its ReLU's mask)."""
    model = copy.deepcopy(model).to(dtype)
    outputs: dict[str, torch.Tensor] = {}
    if record:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(
                    lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone()))
    torch.manual_seed(DROPOUT_SEED)
    loss = F.cross_entropy(model(x.to(dtype)), target)
    rng = torch.get_rng_state()
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    return grads, rng, outputs


def errors(grads: dict, truth: dict) -> tuple[float, dict]:
    """The largest gradient error relative to the largest gradient of the model, and each
    parameter's relative to its own largest element."""
    largest = max(t.abs().max().item() for t in truth.values())
    worst = max((grads[k] - truth[k]).abs().max().item() for k in truth)
    each = {k: ((grads[k] - truth[k]).abs().max() / truth[k].abs().max()).item() for k in truth}
    return worst / largest, each


def margins(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """In float64, how far each ReLU'd conv output and each max-pool choice is from flipping:
    the smallest |pre-activation| / (u * sum |w x| + |b|) over elements, and the smallest gap
    between a window's largest and second largest values / (u * the largest), over windows."""
    model = copy.deepcopy(model).double()
    found: dict[str, float] = {}

    def conv_hook(module, inputs, output, name):
        scale = F.conv2d(inputs[0].abs(), module.weight.abs(), module.bias.abs(),
                         module.stride, module.padding)
        live = scale > 0              # an all-zero window with no bias is 0 in any precision
        found[name] = (output.abs()[live] / (U * scale[live])).min().item()

    def pool_hook(module, inputs, output, name):
        # ceil_mode windows past the edge: pad with -inf as torch's max-pool does
        k, s = module.kernel_size, module.stride
        xin = inputs[0]
        h_out, w_out = output.shape[-2:]
        pad_h = max(0, (h_out - 1) * s + k - xin.shape[-2])
        pad_w = max(0, (w_out - 1) * s + k - xin.shape[-1])
        padded = F.pad(xin, (0, pad_w, 0, pad_h), value=float("-inf"))
        windows = padded.unfold(2, k, s).unfold(3, k, s)[:, :, :h_out, :w_out]
        top2 = windows.flatten(-2).topk(2, dim=-1).values
        best, second = top2[..., 0], top2[..., 1]
        live = best > 0               # ties of exact zeros (ReLU'd) are exact in any precision
        found[name] = ((best - second)[live] / (U * best[live])).min().item()

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, i, o, name=name: conv_hook(m, i, o, name))
        elif isinstance(module, nn.MaxPool2d):
            module.register_forward_hook(lambda m, i, o, name=name: pool_hook(m, i, o, name))
    torch.manual_seed(DROPOUT_SEED)
    with torch.no_grad():
        model(x.double())
    return found


def test_no_relu_or_maxpool_within_rounding_of_a_flip(problem):
    """The precondition of the comparison (module docstring): the model and inputs are chosen so
    that float32 rounding cannot flip a ReLU mask or a max-pool's choice."""
    model, x, _ = problem
    found = margins(model, x)
    assert len(found) == 10        # 8 convs, 2 max-pools
    close = {name: m for name, m in found.items() if m < MARGIN_UNITS}
    assert not close, f"within {MARGIN_UNITS} float32 roundings of a flip: {close}; pick " \
                      "other seeds (the comparison would measure the flip, not the kernels)"


def test_squeezenet_gradients_float32_as_close_to_float64_as_torchs(problem):
    """Float64: zeroskip's gradients equal torch's to 1e-12 (measured ~1e-15). Float32: the
    largest gradient error, relative to the largest gradient, is within twice torch's own plus
    8 units of rounding (FLOOR), and no parameter's error, relative to its own largest element,
    is past 4x the worst of torch's plus FLOOR. (Each conv's kernels accumulate in one
    sequential FMA chain per output; torch's GEMMs keep several partial sums, so on one conv
    alone zeroskip's float32 error is 1-4x torch's, measured on squeezenet1_1's layers; over a
    whole model ~1-2x.) Every ReLU mask of zeroskip's float32 forward is float64's, and the
    converted model draws the same dropout mask (the RNG state after its forward is torch's)."""
    model, x, target = problem
    truth, rng64, masks64 = step(model, torch.float64, x, target, record=True)
    torch32, rng_torch, _ = step(model, torch.float32, x, target)
    converted = zeroskip.convert(copy.deepcopy(model))
    assert sum(type(m).__module__ == "zeroskip.nn" for m in converted.modules()) == 8
    zs32, rng_zs, masks32 = step(converted, torch.float32, x, target, record=True)
    zs64, rng_zs64, _ = step(converted, torch.float64, x, target)
    assert torch.equal(rng_zs, rng_torch) and torch.equal(rng_zs64, rng64)

    worst64, each64 = errors(zs64, truth)
    assert worst64 < 1e-12 and max(each64.values()) < 1e-12, each64

    worst_torch, each_torch = errors(torch32, truth)
    worst_zs, each_zs = errors(zs32, truth)
    report = (f"float32 gradient error relative to the largest: zeroskip {worst_zs:.3e}, torch "
              f"{worst_torch:.3e}; worst parameter: zeroskip {max(each_zs.values()):.3e} "
              f"({max(each_zs, key=each_zs.get)}), torch {max(each_torch.values()):.3e}")
    assert worst_zs <= 2 * worst_torch + FLOOR, report
    assert max(each_zs.values()) <= 4 * max(each_torch.values()) + FLOOR, report

    # Each conv's ReLU mask: a fused conv's output is the ReLU's, (out > 0) the same mask.
    flipped = {n: int(((masks32[n] > 0) != (masks64[n] > 0)).sum()) for n in masks64}
    assert not any(flipped.values()), flipped
