"""Where any ``nn.Module`` classifier can be cut: torch.fx tracing and the single-tensor frontiers of its graph.

A cut right after an *activation node* v (a node computed from the input image) is **valid** when the rest of the
computation depends on what came before only through v (``shared/reference/any-model.md`` §1):

a. no other activation node computed before v is used after v (v is the only live value);
b. v is one tensor, not a tuple, a size or an int (checked on the shapes ShapeProp records);
c. no parameter is read on both sides (a static computation on a parameter, e.g. a relative-position-bias gather,
   would otherwise land in two blocks);
d. v's first consumer is not in-place (an in-place ReLU in block k+1 would overwrite the tensor block k's head read).

Residual, dense and multi-branch units are therefore never cut inside: their input stays live until the merge.
Found by one sweep in execution order: every activation node u is live on [idx(u), last use of u); a parameter-
dependent static node is live between its first and last activation user; v is a cut iff exactly one value (v) is
live right after it and v is used later.

Tracing follows timm's and torchvision's own settings, so the models of both libraries trace: timm's no-trace leaf
modules and wrapped functions, every ``nn.Module`` of ``torchvision.ops`` as a leaf, ``math`` and ``torchvision.ops``
auto-wrapped, ``param_shapes_constant=True``, and every ``forward`` argument after the image fixed to its default.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
from collections.abc import Iterable

import torch
from torch import fx, nn

INPLACE_METHODS_SUFFIX = "_"


def _torchvision_leaves() -> tuple[tuple[type, ...], tuple]:
    try:
        import torchvision.ops
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return (), ()
    leaves = tuple(
        obj
        for obj in vars(torchvision.ops).values()
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__.startswith("torchvision.ops")
    )
    return leaves, (torchvision.ops,)


def _timm_leaves() -> tuple[tuple[type, ...], tuple]:
    try:
        from timm.layers import _fx
    except ImportError:  # timm is an optional extra
        return (), ()
    return tuple(_fx.get_notrace_modules()), tuple(_fx.get_notrace_functions())


class ModelTracer(fx.Tracer):
    """torch.fx tracer with the leaf modules and wrapped functions timm and torchvision trace their models with."""

    def __init__(self) -> None:
        tv_leaves, tv_modules = _torchvision_leaves()
        timm_leaves, timm_functions = _timm_leaves()
        super().__init__(
            autowrap_modules=(math, *tv_modules), autowrap_functions=timm_functions, param_shapes_constant=True
        )
        self.leaf_types = tv_leaves + timm_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, training: bool) -> fx.Graph:
    """The graph of ``model.forward`` in train or eval mode (``self.training`` branches are frozen when traced).

    Arguments after the image are fixed to their defaults (timm's ``attn_mask=None``: a proxy is never None, so left
    free it would record the mask-present branch). Raises whatever fx raises on untraceable code.
    """
    signature = inspect.signature(model.forward)
    params = list(signature.parameters.values())[1:]
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    if missing:
        raise TypeError(f"forward takes required arguments besides the image: {', '.join(missing)}")
    concrete = {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    was_training = model.training
    model.train(training)
    try:
        return ModelTracer().trace(model, concrete_args=concrete or None)
    finally:
        model.train(was_training)


def input_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "placeholder")


def output_value(graph: fx.Graph) -> fx.Node | None:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = out.args[0]
    return value if isinstance(value, fx.Node) else None


def activation_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed (directly or not) from the image placeholder; everything else is static."""
    active = {input_node(graph)}
    for node in graph.nodes:
        if node.op != "output" and any(a in active for a in node.all_input_nodes):
            active.add(node)
    return active


def _reads_parameters(graph: fx.Graph, model: nn.Module, active: set[fx.Node]) -> set[fx.Node]:
    """Static nodes whose value depends on a parameter (a ``get_attr`` of one, or a module that holds some)."""
    params = {name for name, _ in model.named_parameters()}
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node in active:
            continue
        if node.op == "get_attr" and (node.target in params or _has_params(model, node.target)):
            out.add(node)
        elif node.op == "call_module" and any(True for _ in model.get_submodule(node.target).parameters()):
            out.add(node)
        elif any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _has_params(model: nn.Module, target: str) -> bool:
    try:
        obj = model.get_submodule(target)
    except AttributeError:
        return False
    return any(True for _ in obj.parameters())


def _is_inplace(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith(INPLACE_METHODS_SUFFIX) and not node.target.endswith("__")
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace", False))
    return False


def is_single_tensor(node: fx.Node) -> bool:
    """True when ShapeProp recorded one tensor for ``node`` (rule b)."""
    from torch.fx.passes.shape_prop import TensorMetadata

    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def valid_cuts(graph: fx.Graph, model: nn.Module) -> list[fx.Node]:
    """Every activation node after which the graph can be cut (rules a–d), in execution order.

    Needs ``tensor_meta`` from :class:`torch.fx.passes.shape_prop.ShapeProp` on the nodes. The input placeholder
    and the output value are not cuts.
    """
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    active = activation_nodes(graph)
    static_params = _reads_parameters(graph, model, active)
    delta = [0] * (len(nodes) + 1)
    for node in nodes:
        users = [index[u] for u in node.users]
        if node in active and users:
            last = max(users)
            if last > index[node]:
                delta[index[node]] += 1
                delta[last] -= 1
        elif node in static_params:
            active_users = [index[u] for u in node.users if u in active]
            if len(active_users) > 1:
                delta[min(active_users)] += 1
                delta[max(active_users)] -= 1
    final = output_value(graph)
    cuts, live = [], 0
    for node in nodes:
        live += delta[index[node]]
        if node not in active or node.op == "placeholder" or node is final or live != 1:
            continue
        users = sorted(node.users, key=index.__getitem__)
        if not users or max(index[u] for u in users) <= index[node]:
            continue
        if not is_single_tensor(node) or _is_inplace(users[0], model):
            continue
        cuts.append(node)
    return cuts


def tensor_rank(node: fx.Node) -> int:
    return len(node.meta["tensor_meta"].shape)


def module_path(node: fx.Node) -> list[tuple[str, type]]:
    """The modules a node runs inside, outermost first: ``[("layer1", Sequential), ("layer1.0", BasicBlock), …]``."""
    stack = node.meta.get("nn_module_stack") or {}
    path = [value for value in stack.values()]
    if node.op == "call_module":
        path.append((node.target, None))
    return path


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def _is_glue(module: nn.Module) -> bool:
    """Modules that do not start a unit of their own: parameter-free layers and normalisations."""
    has_params = any(True for _ in module.parameters())
    name = type(module).__name__
    named_norm = "Norm" in name and not any(w in name for w in ("Conv", "Linear", "Attention", "Block"))
    return not has_params or isinstance(module, NORMS) or named_norm


def block_list(module: nn.Module) -> nn.Module | None:
    """Where a stage keeps its repeated blocks: the module itself when its children (two or more) are all one
    class (torchvision's RegNet ``AnyStage``, timm's ``RegStage``), or a list child of one repeated class (timm's
    ``stages.N.blocks``); None otherwise. Lists of containers (a ``Conv2dNormActivation`` is a ``Sequential``)
    are layers, not blocks."""
    lists = [c for c in module.children() if type(c) in (nn.Sequential, nn.ModuleList)]
    for holder, least in ((module, 2), *((c, 1) for c in lists)):
        kids = list(holder.children())
        kinds = {type(m) for m in kids}
        if len(kids) >= least and len(kinds) == 1 and not issubclass(kinds.pop(), CONTAINERS):
            return holder
    return None


def unit_of(node: fx.Node, model: nn.Module) -> str | None:
    """The unit a node belongs to (a residual block, a transformer block, a conv layer, the classifier), or None
    for glue (activations, norms, pooling, functional code in ``forward``).

    The unit is the shallowest module on the node's stack that is an element of a container (``Sequential``,
    ``ModuleList``, ``ModuleDict``; a plain container is looked through to its elements) and holds parameters; a child
    of the root when there is none. A unit made of a list of one repeated block class (a timm stage) is refined to
    those blocks. Family-agnostic and a heuristic: it sets only where the default segments start; every cut is
    still checked by :func:`valid_cuts`.
    """
    path = module_path(node)
    if not path:
        return None
    innermost = model.get_submodule(path[-1][0])
    if _is_glue(innermost):
        return None
    names = [name for name, _ in path]
    chosen = None
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        parent = model.get_submodule(names[i - 1]) if i > 0 else model
        if type(module) in CONTAINERS or not any(True for _ in module.parameters()):
            continue
        if isinstance(parent, CONTAINERS) and parent is not model:
            chosen = name
            break
    if chosen is None:
        chosen = names[0]
    holder = block_list(model.get_submodule(chosen))
    if holder is not None:
        for name in (n for n in names if n.startswith(chosen + ".")):
            if model.get_submodule(name.rsplit(".", 1)[0]) is holder:
                return name
    return chosen


def segment_boundaries(graph: fx.Graph, model: nn.Module, cuts: Iterable[fx.Node]) -> list[tuple[str, fx.Node]]:
    """Default segment boundaries: (name of the unit that starts the next segment, the cut node before it).

    Each time the unit changes (not into a unit nested in the current one), the boundary is the last valid cut of
    rank ≥ 3 (before any global pooling) before the new unit's first node. A segment without parameters is merged
    into the one before it.
    """
    index = {n: i for i, n in enumerate(graph.nodes)}
    usable = [c for c in cuts if tensor_rank(c) >= 3]
    active = activation_nodes(graph)
    bounds: list[tuple[str, fx.Node]] = []
    current: str | None = None
    for node in graph.nodes:
        if node not in active or node.op == "placeholder":
            continue
        unit = unit_of(node, model)
        if unit is None or unit == current:
            continue
        if current is not None and unit.startswith(current + "."):
            current = unit  # a unit nested in the current one (a layer of ``encoder``): no boundary
            continue
        if current is not None:
            before = [c for c in usable if index[c] < index[node] and (not bounds or index[c] > index[bounds[-1][1]])]
            if before:
                bounds.append((unit, before[-1]))
        current = unit
    return _merge_parameter_free(graph, model, bounds)


def _merge_parameter_free(graph: fx.Graph, model: nn.Module, bounds: list[tuple[str, fx.Node]]):
    index = {n: i for i, n in enumerate(graph.nodes)}
    edges = [-1, *(index[c] for _, c in bounds), len(index)]
    has_params = []
    for a, b in zip(edges, edges[1:]):
        span = [n for n in graph.nodes if a < index[n] <= b]
        has_params.append(any(_node_has_params(n, model) for n in span))
    kept = [bound for bound, ok in zip(bounds, has_params[1:]) if ok]
    return kept


def _node_has_params(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return any(True for _ in model.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        return isinstance(_resolve(model, node.target), nn.Parameter)
    return False


def _resolve(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def propagate_shapes(graph: fx.Graph, model: nn.Module, x: torch.Tensor) -> None:
    """Record ``tensor_meta`` on every node by running the graph once on ``x`` (no gradients)."""
    from torch.fx.passes.shape_prop import ShapeProp

    # ShapeProp prints a traceback before it re-raises; the caller turns the error into one line
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(fx.GraphModule(model, graph)).propagate(x)
