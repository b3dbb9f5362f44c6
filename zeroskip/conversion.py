"""``convert(model)``: run every torch convolution module of a model on generated kernels.

(Not ``convert.py``: a submodule of that name would shadow the function ``zeroskip.convert``.)
"""
from __future__ import annotations

import collections
import functools
import inspect
import itertools
import operator
import warnings
from typing import Callable

import torch
from torch.fx.node import Node, map_arg

from .nn import FUSED, FUSED_RELU, REPLACEMENTS

_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)
# What returns a new tensor, never its input or a view of it: an in-place ReLU after one of
# these changes no tensor that another path may read.
_FRESH_MODULES = (torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._NormBase,
                  torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Linear)
_FRESH_FUNCTIONS = (operator.add, operator.mul, torch.add, torch.mul, torch.cat)


def convert(model: torch.nn.Module, fuse_relu: bool = True) -> torch.nn.Module:
    """Swap, in place, each module whose class is exactly one of torch's ``Conv{1,2,3}d`` or
    ``ConvTranspose{1,2,3}d`` for zeroskip's subclass (same parameters, buffers and hooks; the
    ``state_dict`` is unchanged), and return the model. Subclasses of torch's modules are left
    alone: their forward may do something else.

    With ``fuse_relu``, ReLUs fuse into the convs beside them where neither module has hooks
    (which would see the difference) and nothing else reads the ReLU's result (nor, for an
    in-place one, its input), so the model computes what it did in train and in eval mode,
    whichever mode it was converted in; the ``state_dict`` stays the same:

    * in an ``nn.Sequential``, a ``ConvNd`` then a ``ReLU`` becomes a ``ConvReLUNd``, and a
      ``ReLU`` then a ``ConvNd`` (after a BatchNorm, say) a ``ReLUConvNd`` (both: a
      ``ReLUConvReLUNd``); the ReLU becomes an ``nn.Identity``. Where the model's forward is
      traced (below), only where the trace shows the Sequential's layers called one into the
      other (not read one by one, as feature extractors do);
    * pairs a model's own ``forward`` makes (residual blocks: ``conv2(relu(bn1(conv1(x))))``)
      are found by tracing it with ``torch.fx``: a ReLU (module, ``torch.relu`` or
      ``F.relu``) whose only user is a conv module called once, or a conv whose only user is
      a ReLU (``nn.Identity`` calls between them aside). fx turns a forward it traces through
      into code fixed to the branches it took, so the trace keeps whole (as one call) torch's
      and zeroskip's modules, modules with hooks, and each module whose traced code differs
      between the model's modes, all-train and all-eval (timm's ``BatchNormAct2d`` reads
      ``self.training``), that changes a parameter or buffer as it runs, or that fx cannot
      trace. Where there are such pairs the return value is a ``torch.fx.GraphModule`` over
      the model's own submodules (the same objects under the same names: parameters,
      buffers, hooks and ``state_dict`` unchanged; a submodule called alone computes what it
      did) with the ReLUs fused: use the returned model. A model whose own forward fx cannot
      trace, or which depends on the mode or on whether an argument defaulting to None is
      given, is left as the Sequential walk made it, with a warning saying why.
    """
    fused: dict[int, list[bool]] = {}       # id(conv) -> [ReLU before, ReLU after]
    if fuse_relu:
        model = _fuse(model, fused)
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


def _registrations(model: torch.nn.Module) -> collections.Counter:
    """How many places of the model each module is registered in, by id: a module registered
    twice may be called on inputs no ReLU produced."""
    return collections.Counter(id(m) for m in model.modules(remove_duplicate=False))


def _fresh_module(module: torch.nn.Module) -> bool:
    return isinstance(module, _FRESH_MODULES) and type(module).__module__.startswith("torch.nn.")


# A Sequential pair may fuse where this says so: (sequential, conv, relu, relu comes first).
_Confirm = Callable[[torch.nn.Sequential, torch.nn.Module, torch.nn.Module, bool], bool]


def _conv_relu_pairs(model, registered, confirm: _Confirm):
    """``(sequential, conv name, relu name)`` for each ``ConvNd`` followed by a ``ReLU`` in an
    ``nn.Sequential`` that may fuse (no hooks, registered once, ``confirm`` agrees); a conv
    fuses once, with the first such ReLU."""
    pairs, fused = [], set()
    for seq in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, relu = seq._modules[first], seq._modules[second]
            if (type(conv) in FUSED_RELU and id(conv) not in fused
                    and registered[id(conv)] == 1 and type(relu) is torch.nn.ReLU
                    and not (_hooked(conv) or _hooked(relu)) and confirm(seq, conv, relu, False)):
                pairs.append((seq, first, second))
                fused.add(id(conv))
    return pairs


def _fuse_sequential(model: torch.nn.Module, fused: dict[int, list[bool]],
                     confirm: _Confirm = lambda *pair: True) -> None:
    """Fuse the pairs of the model's ``nn.Sequential`` modules that ``confirm`` allows."""
    registered = _registrations(model)
    for seq, first, second in _conv_relu_pairs(model, registered, confirm):
        fused.setdefault(id(seq._modules[first]), [False, False])[1] = True
        seq._modules[second] = _identity_for(seq._modules[second])
    for seq in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(seq._modules)
        for i, (first, second) in enumerate(zip(names, names[1:])):
            relu, conv = seq._modules[first], seq._modules[second]
            # An in-place ReLU also changes its input: only safe on a new tensor nothing
            # else holds, the output of the layer before it.
            if (type(relu) is torch.nn.ReLU and type(conv) in FUSED_RELU
                    and not fused.get(id(conv), [False])[0]
                    and not (_hooked(conv) or _hooked(relu)) and registered[id(conv)] == 1
                    and (not relu.inplace or i > 0 and _fresh_module(seq._modules[names[i - 1]]))
                    and confirm(seq, conv, relu, True)):
                fused.setdefault(id(conv), [False, False])[0] = True
                seq._modules[first] = _identity_for(relu)


def _identity_for(relu: torch.nn.Module) -> torch.nn.Identity:
    identity = torch.nn.Identity()
    identity.train(relu.training)       # in the mode of the model around it
    return identity


# ------------------------------------------------------------------------------ tracing
class _Untraceable(Exception):
    """The model's own forward cannot be traced into a graph that holds in every mode."""


class _Tracer(torch.fx.Tracer):
    """fx's tracer, keeping whole (as one ``call_module`` node) torch's and zeroskip's
    modules, hooked modules (fx would run their hooks once, at trace time) and ``leaves``."""

    def __init__(self, leaves: frozenset[int] | set[int] = frozenset()):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return (id(m) in self.leaves or _hooked(m) or type(m).__module__ == "zeroskip.nn"
                or super().is_leaf_module(m, module_qualified_name))


def _trace(model: torch.nn.Module) -> tuple[torch.fx.Graph, dict, set[int]]:
    """The model's forward as an fx graph that holds whatever its modes: the graph, the tensor
    constants fx made for it, and the ids of the modules it keeps whole besides _Tracer's.

    A module traced through becomes code in the graph, so each branch its forward takes on
    ``self.training`` (or on any flag) stays as traced. Each round traces the model in the
    modes it has, all in train mode and all in eval mode (and, where its forward has
    arguments that default to None, with them None); a module whose code differs between
    those traces, that changes a parameter or buffer as it is traced (which fx runs then and
    does not record) or that fx cannot trace is kept whole from then on, until the traces
    agree. Raises _Untraceable where that is the model's own forward. Modes and buffers are
    as they were after."""
    modes = {m: m.training for m in model.modules()}
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    tensors = [*model.parameters(), *buffers]
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        for t in itertools.chain(module._parameters.values(), module._buffers.values()):
            owners.setdefault(id(t), name)
    settings = [(None, None, "")] + [
        (mode, None, "reads the training mode") for mode in (True, False)
        if set(modes.values()) != {mode}]
    try:
        optional = {name: None for name, p in inspect.signature(model.forward).parameters.items()
                    if p.default is None}
    except (TypeError, ValueError):     # no signature to read
        optional = {}
    if optional:
        settings.append((None, optional, "depends on whether its optional arguments are given"))
    attrs = set(vars(model))
    leaves: set[int] = set()
    try:
        for _ in range(len(modes) + 1):
            traces, culprits = [], set()
            for training, concrete, why in settings:
                for m, mode in modes.items():
                    m.training = mode if training is None else training
                tracer = _Tracer(leaves)
                versions = [t._version for t in tensors]
                try:
                    graph = tracer.trace(model, concrete_args=concrete)
                except Exception as exc:     # fx raises many types for what it cannot trace
                    scope = _traced_scope(model, tracer, [name for name, _ in
                                                          tracer.module_stack.values()])
                    if not scope:
                        raise _Untraceable(f"{type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0] if str(exc) else ''}"
                                           ) from None
                    culprits.add(scope)
                    break
                finally:        # fx keeps the tensors it makes on the model: take them back
                    constants = {name: vars(model).pop(name) for name in set(vars(model)) - attrs}
                    with torch.no_grad():
                        for b, value, version in zip(buffers, saved,
                                                     versions[len(tensors) - len(buffers):]):
                            if b._version != version:
                                b.copy_(value)
                for t, version in zip(tensors, versions):
                    if t._version != version:
                        owner = owners[id(t)].split(".") if owners[id(t)] else []
                        culprits.add(_traced_scope(model, tracer, [
                            ".".join(owner[:i]) for i in range(1, len(owner) + 1)]))
                if "" in culprits:
                    raise _Untraceable("its own forward changes parameters or buffers, which "
                                       "fx runs as it traces and does not record")
                if traces:
                    found = _differences(traces[0], (graph, constants))
                    if "" in found:
                        raise _Untraceable(f"its own forward {why}")
                    culprits |= found
                traces.append((graph, constants))
            if not culprits:
                return *traces[0], leaves
            leaves |= {id(model.get_submodule(name)) for name in culprits}
        raise _Untraceable("its traces do not agree")
    finally:
        for m, mode in modes.items():
            m.training = mode
        for name in set(vars(model)) - attrs:
            delattr(model, name)


def _traced_scope(model: torch.nn.Module, tracer: _Tracer, path: list[str]) -> str:
    """The innermost module of ``path`` (qualified names, outermost first) that the tracer
    traces through, above any it keeps whole; ``""``: the model itself."""
    scope = ""
    for name in path:
        if tracer.is_leaf_module(model.get_submodule(name), name):
            break
        scope = name
    return scope


def _scopes(node: Node) -> list[str]:
    """The modules (qualified names, outermost first) whose traced forward made the node."""
    names = [name for name, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and names and names[-1] == node.target:
        names.pop()                     # a leaf's call is made by the module calling it
    return names


def _code(graph: torch.fx.Graph) -> list[Node]:
    """The graph's nodes but its inputs and fx's checks that an input is None."""
    return [n for n in graph.nodes if n.op != "placeholder" and not (
        n.op == "call_function" and n.target is torch.fx._symbolic_trace._assert_is_none)]


def _differences(first: tuple[torch.fx.Graph, dict], second: tuple[torch.fx.Graph, dict]
                 ) -> set[str]:
    """The modules whose code differs between two traces (``""``: the model's own)."""
    (a, consts_a), (b, consts_b) = ((_code(graph), consts) for graph, consts in (first, second))
    index_a, index_b = ({n: i for i, n in enumerate(nodes)} for nodes in (a, b))

    def key(index):
        return lambda n: ("%input", n.target) if n.op == "placeholder" else ("%node", index[n])

    found: set[str] = set()
    for i, (x, y) in enumerate(itertools.zip_longest(a, b)):
        if (x is not None and y is not None and x.op == y.op and _same(x.target, y.target)
                and _scopes(x) == _scopes(y)):
            if not (_same(map_arg((x.args, x.kwargs), key(index_a)),
                          map_arg((y.args, y.kwargs), key(index_b)))
                    and (x.op != "get_attr" or
                         _same_tensor(consts_a.get(x.target), consts_b.get(y.target)))):
                found.add((_scopes(x) or [""])[-1])
            continue
        # The traces part here: blame the innermost module that both, or either and the node
        # before (the same in both), were in. If that module only passed on a difference made
        # by its caller, the next round finds the caller.
        paths = [_scopes(a[i - 1]) if i else []] + [_scopes(n) for n in (x, y) if n is not None]
        common = [[p for p, _ in itertools.takewhile(lambda pq: pq[0] == pq[1], zip(s, t))]
                  for s, t in itertools.combinations(paths, 2)]
        found.add((max(common, key=len) or [""])[-1])
        break
    return found


def _same(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:                   # objects whose == is not a bool
        return repr(a) == repr(b)


def _same_tensor(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and bool(torch.equal(a, b)))


# ------------------------------------------------------------------------------ fusing
def _fuse(model: torch.nn.Module, fused: dict[int, list[bool]]) -> torch.nn.Module:
    """Fuse the model's ReLU pairs; returns the model, or a GraphModule over it where its
    forward's own pairs fused."""
    if type(model) is torch.nn.Sequential or _hooked(model):
        _fuse_sequential(model, fused)  # a Sequential's pairs are all found by the walk
        return model
    try:
        graph, constants, leaves = _trace(model)
    except _Untraceable as exc:
        warnings.warn(f"convert: {type(model).__name__} is not traceable by torch.fx ({exc}); "
                      "only ReLUs inside nn.Sequential were fused", stacklevel=3)
        _fuse_sequential(model, fused)
        return model
    module_of = model.get_submodule     # not cached: the Sequential walk replaces ReLUs
    tracer = _Tracer(leaves)
    calls: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(id(module_of(node.target)), []).append(node)
    called_leaves = {id(module_of(node.target)) for nodes in calls.values() for node in nodes
                     if tracer.is_leaf_module(module_of(node.target), node.target)}
    # Modules inside a module kept whole run on its forward, which the graph does not show.
    inside = {id(sub) for m in model.modules() if id(m) in called_leaves
              for sub in m.modules() if sub is not m}
    registered = _registrations(model)

    def sole_call(module) -> Node | None:
        nodes = calls.get(id(module), [])
        if len(nodes) == 1 and id(module) not in inside and registered[id(module)] == 1:
            return nodes[0]
        return None

    def confirm(seq, conv, relu, relu_first: bool) -> bool:
        """A Sequential pair where the graph shows the Sequential calls them, one into the
        other, and nothing else reads between them; one inside a module kept whole."""
        if id(seq) in inside or id(seq) in called_leaves:
            return not (id(conv) in calls or id(relu) in calls)
        node = sole_call(conv)
        if node is None:
            return False
        if relu_first:
            source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            return (isinstance(source, Node) and source.op == "call_module"
                    and module_of(source.target) is relu and len(source.users) == 1
                    and (not relu.inplace or len(source.args) == 1
                         and isinstance(source.args[0], Node)
                         and _sole_fresh(source.args[0], module_of)))
        users = list(node.users)
        return (len(users) == 1 and users[0].op == "call_module"
                and module_of(users[0].target) is relu and users[0].args == (node,))

    _fuse_sequential(model, fused, confirm)

    def conv_of(node, side: int) -> torch.nn.Module | None:
        if node.op != "call_module" or sole_call(module_of(node.target)) is not node:
            return None
        module = module_of(node.target)
        if type(module) not in FUSED_RELU or _hooked(module) or \
                fused.get(id(module), [False, False])[side]:
            return None
        return module

    changed = False
    for node in list(graph.nodes):
        inplace = _relu(node, module_of)
        if inplace is None or len(node.args) != 1 or len(node.users) != 1 or \
                not isinstance(node.args[0], Node):
            continue
        source = node.args[0]
        last, user = node, next(iter(node.users))       # nn.Identity calls pass values on
        while _identity(user, module_of) and len(user.users) == 1:
            last, user = user, next(iter(user.users))
        producer = source
        while _identity(producer, module_of) and len(producer.users) == 1:
            producer = producer.args[0]
        conv = conv_of(user, 0)
        if conv is not None and user.args == (last,) and not user.kwargs and \
                (not inplace or _sole_fresh(source, module_of)):
            fused.setdefault(id(conv), [False, False])[0] = True     # ReLU, then the conv
        elif len(producer.users) == 1 and (conv := conv_of(producer, 1)) is not None:
            fused.setdefault(id(conv), [False, False])[1] = True     # conv, then ReLU
        else:
            continue
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        changed = True
    if not changed:
        return model
    graph.lint()
    return _graph_module(model, graph, constants)


def _relu(node: Node, module_of) -> bool | None:
    """Whether the node's ReLU is in-place; None where it is no ReLU (or a hooked one)."""
    if node.op == "call_module":
        module = module_of(node.target)
        return module.inplace if type(module) is torch.nn.ReLU and not _hooked(module) else None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return None if node.kwargs.get("inplace", False) else False
    return False if node.op == "call_method" and node.target == "relu" else None


def _identity(node: Node, module_of) -> bool:
    """Whether the node calls an ``nn.Identity`` (without hooks) on one value."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or \
            not isinstance(node.args[0], Node):
        return False
    module = module_of(node.target)
    return type(module) is torch.nn.Identity and not _hooked(module)


def _sole_fresh(node: Node, module_of) -> bool:
    """Whether the node's value is a new tensor that only its one user reads (through
    ``nn.Identity`` calls, which pass their input on): an in-place ReLU on it changes nothing
    another path reads."""
    while _identity(node, module_of) and len(node.users) == 1:
        node = node.args[0]
    if len(node.users) != 1:
        return False
    if node.op == "call_module":
        return _fresh_module(module_of(node.target))
    return node.op == "call_function" and node.target in _FRESH_FUNCTIONS


def _graph_module(model: torch.nn.Module, graph: torch.fx.Graph,
                  constants: dict) -> torch.fx.GraphModule:
    """A GraphModule running ``graph`` over the model's own tree: its very submodules,
    parameters and buffers under their names (so hooks, ``state_dict`` and calls to a
    submodule are as before); the tensor constants fx made are non-persistent buffers."""
    targets = {node.target for node in graph.nodes if node.op in ("call_module", "get_attr")}
    root = {t: constants[t] if t in constants else
            functools.reduce(getattr, t.split("."), model) for t in targets}
    gm = torch.fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.training = model.training
    for store in ("_modules", "_parameters", "_buffers"):
        getattr(gm, store).clear()
        getattr(gm, store).update(getattr(model, store))
    gm._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    for name in targets - constants.keys():
        if "." not in name and not any(name in getattr(gm, store) for store in
                                       ("_modules", "_parameters", "_buffers")):
            setattr(gm, name, getattr(model, name))     # a plain tensor attribute
    for name in targets & constants.keys():
        gm.register_buffer(name, constants[name], persistent=False)
    return gm


__all__ = ["convert"]
