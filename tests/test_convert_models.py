"""``convert()`` on model definitions that bring their own blocks, as timm's and torchvision's
do: the converted model computes what torch's does in train mode, in eval mode and with frozen
BatchNorm, whichever of those it was converted in, and across switches between them.

The blocks copy what those libraries write (a BatchNorm subclass that branches on
``self.training`` and holds its ReLU, a ReLU read twice, a Sequential read layer by layer, an
in-place ReLU). Every conv is 4 -> 4 channels, 3x3 on 6x6, so the whole file compiles only a
few kernels."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zeroskip
import zeroskip.nn as ZN

C, SIZE = 4, 6
MODES = ("train", "eval", "frozen")


def conv() -> nn.Conv2d:
    return nn.Conv2d(C, C, 3, padding=1, bias=False)


def set_mode(model: nn.Module, mode: str) -> None:
    """train, eval, or frozen: train mode with every BatchNorm in eval mode (fine-tuning)."""
    model.train(mode != "eval")
    if mode == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def assert_faithful(build, x: torch.Tensor, convert_modes=MODES, **convert_kwargs):
    """Convert a fresh ``build()`` in each mode and compare it with a copy made before, in
    every mode and back (1e-5 relative; dropout masks seeded alike), and the BatchNorm
    statistics the train-mode calls leave. Returns the converted models by mode."""
    converted_by_mode = {}
    for convert_mode in convert_modes:
        torch.manual_seed(0)
        model = build()
        set_mode(model, convert_mode)
        reference = copy.deepcopy(model)
        before = copy.deepcopy(model.state_dict())
        converted = zeroskip.convert(model, **convert_kwargs)
        after = converted.state_dict()
        assert list(after) == list(before), "convert changed the state_dict's keys"
        for key, value in before.items():
            assert torch.equal(after[key], value), f"convert changed {key}"
        assert [m.training for m in converted.modules()] == \
            [m.training for m in reference.modules()]
        for mode in ("train", "eval", "frozen", "train", "eval", convert_mode):
            set_mode(converted, mode)
            set_mode(reference, mode)
            with torch.no_grad():
                torch.manual_seed(1)
                got = converted(x.clone())
                torch.manual_seed(1)
                want = reference(x.clone())
            error = float((got - want).norm() / want.norm())
            assert error <= 1e-5, (f"converted in {convert_mode}, run in {mode}: relative "
                                   f"error {error:.2e}")
        state = converted.state_dict()
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
        converted_by_mode[convert_mode] = converted
    return converted_by_mode


def fused_type(model: nn.Module, name: str) -> type:
    return type(model.get_submodule(name))


def inputs(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, C, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


# ------------------------------------------------------------------------------ timm-style
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: BatchNorm's forward copied (it reads ``self.training`` and
    counts batches on its buffer in place), then its own drop and act modules."""

    def __init__(self, num_features: int, act_layer=nn.ReLU):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True)

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        training = True if self.training else (self.running_mean is None
                                               and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats
                         else None,
                         self.running_var if not self.training or self.track_running_stats
                         else None, self.weight, self.bias, training, factor, self.eps)
        return self.act(self.drop(x))


class DepthwiseSeparable(nn.Module):
    """timm's ``DepthwiseSeparableConv``: conv, BatchNormAct (ReLU), conv, BatchNormAct (no
    act), plus the input."""

    def __init__(self):
        super().__init__()
        self.conv_dw, self.bn1 = conv(), BatchNormAct2d(C)
        self.conv_pw, self.bn2 = conv(), BatchNormAct2d(C, act_layer=nn.Identity)

    def forward(self, x):
        return self.bn2(self.conv_pw(self.bn1(self.conv_dw(x)))) + x


class MixNetLike(nn.Module):
    """timm's EfficientNet/MixNet layout: a stem conv, a BatchNormAct, Sequential stages of
    blocks, a head conv and BatchNormAct, pooling."""

    def __init__(self):
        super().__init__()
        self.conv_stem, self.bn1 = conv(), BatchNormAct2d(C)
        self.blocks = nn.Sequential(nn.Sequential(DepthwiseSeparable()),
                                    nn.Sequential(DepthwiseSeparable(), DepthwiseSeparable()))
        self.conv_head, self.bn2 = conv(), BatchNormAct2d(C)

    def forward(self, x):
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x))))).mean((2, 3))


def test_timm_style_batch_norm_act_is_kept_whole():
    """The issue's case: tracing through BatchNormAct2d fixed the BatchNorm to the mode it was
    traced in, dropped its batch count and fused its ReLU into the next conv."""
    models = assert_faithful(MixNetLike, inputs())
    for model in models.values():
        assert fused_type(model, "blocks.0.0.conv_pw") is ZN.Conv2d
        assert isinstance(model.get_submodule("blocks.0.0.bn1.act"), nn.ReLU)


def test_converting_does_not_count_batches():
    torch.manual_seed(0)
    model = MixNetLike().train()
    zeroskip.convert(model)
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))


# ------------------------------------------------------------------------------ torchvision
class BasicBlock(nn.Module):
    """torchvision's: one in-place ReLU module called twice, ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = conv(), nn.BatchNorm2d(C)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv(), nn.BatchNorm2d(C)
        self.downsample = None

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = conv(), nn.BatchNorm2d(C), nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(), BasicBlock())
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_torchvision_basic_blocks_fuse_and_keep_the_model_tree():
    models = assert_faithful(ResNetLike, inputs())
    torch.manual_seed(0)
    original = ResNetLike()
    names = [name for name, _ in original.named_modules()]
    for model in models.values():
        assert isinstance(model, torch.fx.GraphModule)
        # relu(bn1(conv1(x))) feeds conv2 alone; a block's input is read by the shortcut too.
        assert fused_type(model, "layer1.0.conv2") is ZN.ReLUConv2d
        assert fused_type(model, "layer1.1.conv1") is ZN.Conv2d
        assert [name for name, _ in model.named_modules()][1:] == names[1:]
    # The model's own submodules: hooks on them run, a block called alone is still right.
    model = models["eval"]
    seen = []
    model.layer1[1].conv2.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    reference = copy.deepcopy(original).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, C, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.layer1[0](x), reference.layer1[0](x.clone()),
                                   rtol=1e-5, atol=1e-6)
    assert seen == [torch.Size([4, C, SIZE, SIZE])]
    with torch.no_grad():
        torch.testing.assert_close(copy.deepcopy(model)(x), reference(x), rtol=1e-5, atol=1e-6)


def test_a_hooked_block_is_kept_whole():
    """fx would run a hook once, as it traces: the hooked block stays one call."""
    def build():
        model = ResNetLike()
        model.layer1[0].register_forward_hook(lambda m, args, out: calls.append(out.shape))
        return model

    calls = []
    models = assert_faithful(build, inputs(), convert_modes=("eval",))
    assert fused_type(models["eval"], "layer1.0.conv2") is ZN.Conv2d
    assert fused_type(models["eval"], "layer1.1.conv2") is ZN.ReLUConv2d
    calls.clear()
    with torch.no_grad():
        models["eval"](inputs())
    assert calls == [torch.Size([4, C, SIZE, SIZE])]


# ------------------------------------------------------------------------------ ReLU users
class ReadTwice(nn.Module):
    """A ReLU's output goes into a conv and into the sum: it must stay."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv1, self.bn = conv(), nn.BatchNorm2d(C)
        self.relu = nn.ReLU()
        self.conv2 = conv()

    def forward(self, x):
        y = self.bn(self.conv1(x))
        y = torch.relu(y) if self.functional else self.relu(y)
        return self.conv2(y) + y


class InPlaceAlias(nn.Module):
    """An in-place ReLU changes the tensor it is given, which the sum reads too (the ReLU's
    own output has one user), and a Sequential starting with one changes the caller's."""

    def __init__(self):
        super().__init__()
        self.bn, self.relu, self.conv = nn.BatchNorm2d(C), nn.ReLU(inplace=True), conv()
        self.head = nn.Sequential(nn.ReLU(inplace=True), conv())

    def forward(self, x):
        y = self.bn(x)
        out = self.conv(self.relu(y)) + y
        return self.head(out) + out


@pytest.mark.parametrize("functional", [False, True])
def test_a_relu_read_twice_is_not_fused(functional):
    models = assert_faithful(lambda: ReadTwice(functional), inputs(), convert_modes=("eval",))
    assert fused_type(models["eval"], "conv2") is ZN.Conv2d


def test_an_in_place_relu_whose_input_is_read_elsewhere_is_not_fused():
    models = assert_faithful(InPlaceAlias, inputs(), convert_modes=("train",))
    assert fused_type(models["train"], "conv") is ZN.Conv2d
    assert fused_type(models["train"], "head.1") is ZN.Conv2d


# ------------------------------------------------------------------------------ mode-dependent
class TrainOnlyShortcut(nn.Module):
    """Its forward reads the ReLU's output once in eval mode and twice in train mode."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.relu, self.conv2 = conv(), nn.BatchNorm2d(C), nn.ReLU(), conv()

    def forward(self, x):
        y = self.relu(self.bn(self.conv1(x)))
        if self.training:
            return self.conv2(y) + y
        return self.conv2(y)


class DropoutBlock(nn.Module):
    """timm's heads and blocks: ``F.dropout(..., training=self.training)``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = conv(), conv()

    def forward(self, x):
        return self.conv2(F.relu(F.dropout(self.conv1(x), 0.5, training=self.training)))


class ModeDependentBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = TrainOnlyShortcut(), DropoutBlock()
        self.third = nn.Sequential(conv(), nn.BatchNorm2d(C), nn.ReLU())
        self.last = conv()

    def forward(self, x):
        return self.last(self.third(self.second(self.first(x))))


def test_blocks_that_read_the_training_mode_are_kept_whole():
    models = assert_faithful(ModeDependentBlocks, inputs())
    for model in models.values():
        assert fused_type(model, "first.conv2") is ZN.Conv2d
        assert fused_type(model, "second.conv2") is ZN.Conv2d
        assert fused_type(model, "last") is ZN.ReLUConv2d     # the rest still fuses


class DropoutHead(nn.Module):
    """The model's own forward reads the mode: nothing to keep whole, so no graph."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv(), nn.ReLU(), conv())

    def forward(self, x):
        return F.dropout(self.features(x), 0.5, training=self.training)


def test_a_forward_that_reads_the_training_mode_keeps_its_sequential_fusions():
    with pytest.warns(UserWarning, match="reads the training mode"):
        models = assert_faithful(DropoutHead, inputs())
    for model in models.values():
        assert type(model) is DropoutHead and fused_type(model, "features.0") is ZN.ConvReLU2d


# ------------------------------------------------------------------------------ other shapes
class FeatureTaps(nn.Module):
    """Reads a Sequential layer by layer (feature extractors do): a conv's own output is
    used, so its ReLU in the Sequential must stay."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv(), nn.ReLU(), conv(), nn.ReLU())
        self.head = nn.Sequential(conv(), nn.ReLU())

    def forward(self, x):
        taps = []
        for layer in self.features:
            x = layer(x)
            taps.append(x.mean((2, 3)))
        return torch.cat(taps + [self.head(x).mean((2, 3))], 1)


def test_a_sequential_read_layer_by_layer_keeps_its_relus():
    models = assert_faithful(FeatureTaps, inputs(), convert_modes=("eval",))
    model = models["eval"]
    assert fused_type(model, "features.0") is ZN.Conv2d
    assert fused_type(model, "features.2") is ZN.Conv2d
    assert fused_type(model, "head.0") is ZN.ConvReLU2d and isinstance(model.head[1],
                                                                        nn.Identity)


class DataDependent(nn.Module):
    """Control flow on values: fx cannot trace it, so it is kept whole (its Sequential's
    pairs still fuse)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(), conv())

    def forward(self, x):
        return self.body(x) if x.mean() > 0 else self.body(-x)


class WithUntraceableBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.block, self.conv2 = conv(), DataDependent(), conv()

    def forward(self, x):
        return self.conv2(torch.relu(self.block(self.conv1(x))))


def test_an_untraceable_block_is_kept_whole_and_the_rest_fuses():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models = assert_faithful(WithUntraceableBlock, inputs(), convert_modes=("train",))
    model = models["train"]
    assert isinstance(model, torch.fx.GraphModule)
    assert fused_type(model, "conv2") is ZN.ReLUConv2d
    assert fused_type(model, "block.body.2") is ZN.ReLUConv2d


class OptionalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = conv(), conv()

    def forward(self, x, scale=None):
        y = torch.relu(self.conv1(x))
        if scale is not None:
            return self.conv2(y) * scale + y
        return self.conv2(y)


def test_a_forward_that_branches_on_an_optional_argument_is_not_traced():
    torch.manual_seed(0)
    model = OptionalScale()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="optional arguments"):
        converted = zeroskip.convert(model)
    x = inputs()
    with torch.no_grad():
        for args in ((x,), (x, 2.0)):
            torch.testing.assert_close(converted(*args), reference(*args), rtol=1e-5,
                                       atol=1e-6)


# ------------------------------------------------------------------------------ timm itself
def test_timm_mixnet_s_matches_torch_in_both_modes():
    """The issue's model, where timm is installed."""
    timm = pytest.importorskip("timm")

    def build():
        return timm.create_model("mixnet_s", num_classes=10)

    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    assert_faithful(build, x, convert_modes=("train", "eval"))
