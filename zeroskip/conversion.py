"""``convert(model)``: run every torch convolution module of a model on generated kernels.

(Not ``convert.py``: a submodule of that name would shadow the function ``zeroskip.convert``.)
"""
from __future__ import annotations

import warnings

import torch

from .nn import FUSED, FUSED_RELU, REPLACEMENTS

_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


def convert(model: torch.nn.Module, fuse_relu: bool = True) -> torch.nn.Module:
    """Swap, in place, each module whose class is exactly one of torch's ``Conv{1,2,3}d`` or
    ``ConvTranspose{1,2,3}d`` for zeroskip's subclass (same parameters, buffers and hooks; the
    ``state_dict`` is unchanged), and return the model. Subclasses of torch's modules are left
    alone: their forward may do something else.

    With ``fuse_relu``, ReLUs fuse into the convs beside them where neither module has hooks
    (which would see the difference), and the ``state_dict`` stays the same:

    * in an ``nn.Sequential``, a ``ConvNd`` then a ``ReLU`` becomes a ``ConvReLUNd``, and a
      ``ReLU`` then a ``ConvNd`` (after a BatchNorm, say) a ``ReLUConvNd`` (both: a
      ``ReLUConvReLUNd``); the ReLU becomes an ``nn.Identity``;
    * pairs a model's own ``forward`` makes (residual blocks: ``conv2(relu(bn1(conv1(x))))``)
      are found by tracing it with ``torch.fx``: a ReLU (module, ``torch.relu`` or
      ``F.relu``) whose only user is a conv module called once, or a conv whose only user is
      a ReLU. Where there are such pairs the return value is a ``torch.fx.GraphModule`` over
      the same submodules (same names, parameters, buffers and hooks; the ``state_dict`` is
      unchanged) with the ReLUs fused, the fused ``nn.ReLU`` modules no longer in it: use the
      returned model. A model fx cannot trace is left as the Sequential walk made it, with a
      warning saying why.
    """
    fused: dict[int, list[bool]] = {}       # id(conv) -> [ReLU before, ReLU after]
    if fuse_relu:
        _fuse_sequential(model, fused)
        model = _fuse_traced(model, fused)
    convs = {id(m): m for m in model.modules()}
    for module in list(convs.values()):
        replacement = REPLACEMENTS.get(type(module))
        if replacement is None:
            continue
        before, after = fused.get(id(module), (False, False))
        if type(module) in FUSED_RELU:
            replacement = FUSED[(before, after)][replacement._rank - 1]
        module.__class__ = replacement
    return model


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or
                module._backward_hooks or getattr(module, "_backward_pre_hooks", None))


def fusable_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Sequential, str, str]]:
    """``(sequential, conv name, relu name)`` for each ``ConvNd`` that ``convert(model,
    fuse_relu=True)`` fuses with the ``ReLU`` after it in an ``nn.Sequential``; changes
    nothing (``zeroskip trace`` asks which layers will run a fused kernel). A conv fuses once,
    with the first such ReLU."""
    pairs, fused = [], set()
    for seq in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, relu = seq._modules[first], seq._modules[second]
            if (type(conv) in FUSED_RELU and id(conv) not in fused
                    and type(relu) is torch.nn.ReLU and not (_hooked(conv) or _hooked(relu))):
                pairs.append((seq, first, second))
                fused.add(id(conv))
    return pairs


def _fuse_sequential(model: torch.nn.Module, fused: dict[int, list[bool]]) -> None:
    for seq, first, second in fusable_pairs(model):
        fused.setdefault(id(seq._modules[first]), [False, False])[1] = True
        seq._modules[second] = torch.nn.Identity()
    for seq in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            relu, conv = seq._modules[first], seq._modules[second]
            if (type(relu) is torch.nn.ReLU and type(conv) in FUSED_RELU
                    and not fused.get(id(conv), [False])[0]
                    and not (_hooked(conv) or _hooked(relu)) and _called_once(model, conv)):
                fused.setdefault(id(conv), [False, False])[0] = True
                seq._modules[first] = torch.nn.Identity()


def _called_once(model: torch.nn.Module, conv: torch.nn.Module) -> bool:
    """Whether ``conv`` is one module of the model, registered once (a shared module could be
    called on inputs no ReLU produced)."""
    return sum(m is conv for m in model.modules(remove_duplicate=False)) == 1


def _fuse_traced(model: torch.nn.Module, fused: dict[int, list[bool]]) -> torch.nn.Module:
    """The ReLU pairs of the model's own forward, found by torch.fx; the model itself where
    there are none."""
    if type(model) is torch.nn.Sequential or _hooked(model):
        return model                # a Sequential's pairs are all found by the walk
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as exc:       # fx raises many types for what it cannot trace
        warnings.warn(f"convert: {type(model).__name__} is not traceable by torch.fx "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                      "only ReLUs inside nn.Sequential were fused", stacklevel=3)
        return model
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def conv_of(node) -> torch.nn.Module | None:
        if node.op != "call_module" or calls.get(node.target) != 1:
            return None
        module = modules[node.target]
        return module if type(module) in FUSED_RELU and not _hooked(module) else None

    def is_relu(node) -> bool:
        if node.op == "call_module":
            module = modules[node.target]
            return type(module) is torch.nn.ReLU and not _hooked(module)
        if node.op == "call_function":
            return node.target in _RELU_FUNCTIONS and not node.kwargs.get("inplace", False)
        return node.op == "call_method" and node.target == "relu"

    changed = False
    for node in list(graph.nodes):
        if not is_relu(node) or len(node.args) != 1 or len(node.users) != 1:
            continue
        source, (user,) = node.args[0], list(node.users)
        conv = conv_of(user)
        if conv is not None and user.args[:1] == (node,) and len(user.args) == 1 \
                and not fused.get(id(conv), [False])[0]:
            fused.setdefault(id(conv), [False, False])[0] = True     # ReLU, then the conv
        elif isinstance(source, torch.fx.Node) and len(source.users) == 1 and \
                conv_of(source) is not None and not fused.get(id(conv_of(source)),
                                                             [False, False])[1]:
            fused.setdefault(id(conv_of(source)), [False, False])[1] = True  # conv, then ReLU
        else:
            continue
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        changed = True
    if not changed:
        return model
    graph.lint()
    return torch.fx.GraphModule(graph_module, graph, class_name=type(model).__name__)


__all__ = ["convert", "fusable_pairs"]
