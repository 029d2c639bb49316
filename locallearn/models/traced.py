"""Any ``nn.Module`` classifier as a :class:`LayeredModel`: the same sequence of atomic segments as locallearn's
own models, built from the user's module by tracing (``shared/reference/any-model.md`` §2, option A).

Pipeline (:func:`trace_model`):

1. **Plan** on a deep copy of the model (:func:`plan_cuts`, cached per model structure and input shape): trace in
   train and in eval mode (:mod:`locallearn.models.tracing`), record shapes with one probe batch, find every valid
   cut, and group the cuts into segments (stem | each residual / transformer block | … | pooling + classifier).
2. **Extract** one ``fx.GraphModule`` per segment and mode with the *user's model as root*: the graph modules hold
   the user's own submodules, parameters and buffers (no copies), so the user's object holds the trained weights and
   its ``state_dict()`` keys are unchanged. Buffers read through ``get_attr`` (a traced-through norm's running
   statistics) are reached through their owning module, so moving the model to a device keeps them shared.
3. **Validate** on the copy: the composed segments must reproduce the model's own output bit for bit, in train mode
   (same seed before both calls, so drop-path and dropout draw the same masks) and in eval mode; every parameter the
   forward uses must lie in exactly one segment. Otherwise the model is refused, never trained silently wrong.

Python branches on ``self.training`` are frozen when traced, so each segment keeps a train graph and an eval graph
and runs the one its mode asks for (torchvision's ``DualGraphModule`` idea). Forward hooks on modules that are traced
through (not leaves) do not fire when the segments run; hooks on leaf modules (convolutions, norms) do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from locallearn.errors import UserError
from locallearn.models import tracing
from locallearn.models.layered import LayeredModel
from locallearn.models.layouts import Layout, frontier_layout, stages_from_shapes
from locallearn.module_copy import clone_module


class TraceRefused(UserError):
    """The model cannot be cut (untraceable, no cuts, non-tensor output, or segments that do not reproduce it)."""


@dataclass
class CutInfo:
    """One valid cut, for ``locallearn list --cuts``: the node, the module it ends in, and what crosses it."""

    node: str
    module: str
    shape: tuple[int, ...]
    bytes_per_example: int


@dataclass
class CutPlan:
    """Where a model is cut, found once on real tensors and reused (also under fake tensors, where nothing runs).

    Attributes:
        ends: per mode ("train", "eval"), the node names that end segments 0..S−2 (the last ends at the output).
        names: a readable name per segment (the unit it starts with: ``layer2.0``, ``blocks.3``, ``fc``).
        shapes: output shape of each segment for one example (the batch dimension dropped).
        layouts: "nchw", "nhwc", "tokens" or "vector" per segment output.
        stage_of: stage per segment: 0 for the first, then +1 at each change of resolution (MAN's λ ramp by stage).
        modules: the module paths each segment runs (to map a module name given as a cut to a segment).
        cuts: every valid cut of the train graph (a segment boundary is one of them).
        token_pool: how the model's own head reads tokens, ("token" | "avg", number of prefix tokens), or None.
        unused: parameters the forward never reads (e.g. auxiliary classifiers), which no block trains.
    """

    arch: str
    input_shape: tuple[int, ...]
    ends: dict[str, list[str]]
    names: list[str]
    shapes: list[tuple[int, ...]]
    layouts: list[Layout]
    stage_of: list[int]
    modules: list[list[str]]
    cuts: list[CutInfo] = field(default_factory=list)
    token_pool: tuple[str, int] | None = None
    unused: list[str] = field(default_factory=list)

    @property
    def max_blocks(self) -> int:
        """The largest K: every segment but the classifier's may end a block."""
        return max(1, len(self.names) - 1)


class TracedSegment(nn.Module):
    """One segment of a traced model: its train-mode and eval-mode graphs over the user's modules."""

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule, name: str) -> None:
        super().__init__()
        self.train_graph = train_graph
        # the same code in both modes (most models): one graph module, not two
        self.eval_graph = train_graph if train_graph.code == eval_graph.code else eval_graph
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.train_graph(x) if self.training else self.eval_graph(x)


class TracedModel(LayeredModel):
    """A user's model as atomic segments that share its parameters.

    ``source`` is the user's module (kept as a plain attribute, not a submodule, so ``parameters()`` lists only what
    the forward uses); ``state_dict``/``load_state_dict`` are the user's model's, with its own keys.
    """

    def __init__(self, source: nn.Module, segments: list[TracedSegment], plan: CutPlan) -> None:
        super().__init__(segments, names=plan.names, stage_of=plan.stage_of, arch=plan.arch)
        self.__dict__["source"] = source
        self.plan = plan
        self.layouts = list(plan.layouts)

    def train(self, mode: bool = True) -> TracedModel:
        super().train(mode)
        self.source.train(mode)  # flags of modules that were traced through stay the user's to read
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.source._apply(fn, recurse)  # unused parts too, so the user's model is on one device
        return self

    def state_dict(self, *args, **kwargs):
        return self.source.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.source.load_state_dict(state_dict, strict=strict, assign=assign)

    def fresh_layer(self, j: int) -> nn.Module:
        """A new, re-initialised copy of segment ``j`` (AugLocal's auxiliary layers): no tensor is shared."""
        layer = clone_module(self.layers[j])
        for module in layer.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not layer:
                reset()
        layer.requires_grad_(True)
        return layer


# -- extraction ------------------------------------------------------------------------------------------------------
def extract(model: nn.Module, graph: fx.Graph, ends: list[str]) -> list[fx.GraphModule]:
    """One ``GraphModule`` per segment, rooted at ``model`` (its modules and tensors, not copies).

    Activation nodes are copied in order; static nodes (``get_attr``, constants, computations on parameters only) are
    copied on demand into each segment that uses them. ``graph.eliminate_dead_code()`` is never called: it would
    delete in-place ops whose result is unused, such as timm's drop-path scaling.
    """
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    active = tracing.activation_nodes(graph)
    starts = [tracing.input_node(graph), *(by_name[name] for name in ends)]
    stops = [*(by_name[name] for name in ends), tracing.output_value(graph)]
    out = []
    for start, stop in zip(starts, stops):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {start: g.placeholder("x")}

        def copy_node(node: fx.Node, env=env, g=g) -> fx.Node:
            if node not in env:
                for arg in node.all_input_nodes:
                    copy_node(arg)
                env[node] = g.node_copy(node, lambda a: env[a])
            return env[node]

        for node in nodes[index[start] + 1 : index[stop] + 1]:
            if node in active:
                copy_node(node)
        g.output(env[stop])
        gm = fx.GraphModule(model, g)
        _share_buffer_owners(gm, model)
        out.append(gm)
    return out


def _share_buffer_owners(gm: fx.GraphModule, model: nn.Module) -> None:
    """Let ``get_attr`` of a buffer reach it through the user's owning module, not a copy of the reference that
    ``GraphModule`` makes (``.to(device)`` replaces buffer objects, which would leave the two apart)."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, _ = node.target.rpartition(".")
        if not owner:
            continue
        value = tracing._resolve(model, node.target)
        if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
            parent, _, name = owner.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, model.get_submodule(owner))


# -- planning --------------------------------------------------------------------------------------------------------
_PLANS: dict[tuple, CutPlan] = {}


def _plan_key(model: nn.Module, input_shape: tuple[int, ...]) -> tuple:
    """Same class, same parameter shapes and the same module tree as printed (which shows options such as a
    drop-path rate that change the graph without changing any parameter) share one plan."""
    params = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    return type(model).__module__, type(model).__qualname__, params, repr(model), tuple(input_shape)


def _is_fake(model: nn.Module) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) for t in [*model.parameters(), *model.buffers()])


def token_pool(model: nn.Module) -> tuple[str, int] | None:
    """How the model's own head reads a token sequence: timm's ``global_pool`` and ``num_prefix_tokens``;
    torchvision's ViT reads its class token; None if unknown (heads then average the tokens)."""
    pool = getattr(model, "global_pool", None)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if isinstance(pool, str) and pool:
        return ("token" if pool == "token" else "avg"), prefix
    if isinstance(getattr(model, "class_token", None), nn.Parameter):
        return "token", 1
    return None


def _segment_modules(graph: fx.Graph, ends: list[str]) -> list[list[str]]:
    names = set(ends)
    out: list[list[str]] = [[]]
    for node in graph.nodes:
        for path, _ in tracing.module_path(node):
            if path not in out[-1]:
                out[-1].append(path)
        if node.name in names:
            out.append([])
    return out


def plan_cuts(model: nn.Module, input_shape: tuple[int, ...], arch: str | None = None) -> CutPlan:
    """Find and group the cuts of ``model`` for inputs of ``input_shape`` (C, H, W); see the module docstring.

    Runs on a deep copy, so the user's model (its BatchNorm statistics, its RNG stream) is left as it was.
    Cached: the same architecture and input shape are planned once per process.

    Raises:
        TraceRefused: the model does not trace, returns something other than (N, classes) logits, or its
            segments do not reproduce its forward.
    """
    key = _plan_key(model, input_shape)
    if key in _PLANS:
        return _PLANS[key]
    arch = arch or type(model).__name__
    if _is_fake(model):
        raise TraceRefused(f"{arch} must be planned on real tensors before it is built under fake tensors")
    probe = copy.deepcopy(model)
    graphs = _trace_both(probe, arch)
    x = _probe_input(input_shape, next((p.device for p in model.parameters()), torch.device("cpu")))
    cuts, bounds = {}, {}
    with torch.random.fork_rng(devices=[]):
        for mode, graph in graphs.items():
            cuts[mode] = _valid_cuts_on(graph, probe, x, mode, arch, input_shape)
            bounds[mode] = tracing.segment_boundaries(graph, probe, cuts[mode])
    # boundaries are matched across the two graphs by the unit they start, not by node name
    common = [label for label, _ in bounds["train"] if label in {label for label, _ in bounds["eval"]}]
    ends = {mode: [node.name for label, node in b if label in common] for mode, b in bounds.items()}
    train_graph = graphs["train"]
    by_name = {n.name: n for n in train_graph.nodes}
    end_nodes = [by_name[name] for name in ends["train"]] + [tracing.output_value(train_graph)]
    shapes = [tuple(n.meta["tensor_meta"].shape[1:]) for n in end_nodes]
    active = tracing.activation_nodes(train_graph)
    layouts = [frontier_layout(n, probe, active) for n in end_nodes[:-1]] + ["vector"]
    first_unit = next((u for n in train_graph.nodes if (u := tracing.unit_of(n, probe)) is not None), "input")
    plan = CutPlan(
        arch=arch,
        input_shape=tuple(input_shape),
        ends=ends,
        names=[first_unit, *common],
        shapes=shapes,
        layouts=layouts,
        stage_of=stages_from_shapes(shapes, layouts),
        modules=_segment_modules(train_graph, ends["train"]),
        cuts=[_cut_info(n) for n in cuts["train"]],
        token_pool=token_pool(probe),
    )
    _drop_constants(probe)
    used = _validate(probe, plan, x)
    plan.unused = [name for name, p in model.named_parameters() if name not in used]
    _PLANS[key] = plan
    return plan


def _trace_both(probe: nn.Module, arch: str) -> dict[str, fx.Graph]:
    """The train-mode and eval-mode graphs, or a refusal naming what fx could not trace."""
    try:
        return {mode: tracing.trace(probe, mode == "train") for mode in ("train", "eval")}
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, … on untraceable Python
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceRefused(
            f"{arch} cannot be cut into blocks: torch.fx could not trace it ({type(err).__name__}: {first[:200]}); "
            "the largest K that works is 1 (train it end to end), or remove the data-dependent Python from forward"
        ) from None


def _valid_cuts_on(
    graph: fx.Graph, probe: nn.Module, x: Tensor, mode: str, arch: str, input_shape: tuple[int, ...]
) -> list[fx.Node]:
    """Shapes recorded by one probe batch in ``mode``, the output checked to be logits, then the valid cuts."""
    probe.train(mode == "train")
    try:
        tracing.propagate_shapes(graph, probe, x)
    except Exception as err:  # the model's own error on this input size (a fixed attention-bias grid, …)
        cause = err.__cause__ or err
        raise UserError(
            f"{arch} does not run on inputs of shape {tuple(input_shape)} ({type(cause).__name__}: "
            f"{str(cause).strip().splitlines()[0][:200]}): give it the image size it was built for"
        ) from None
    final = tracing.output_value(graph)
    if final is None or not tracing.is_single_tensor(final) or tracing.tensor_rank(final) != 2:
        raise TraceRefused(
            f"{arch} cannot be cut into blocks: in {mode} mode its output is not one (N, classes) tensor of "
            "logits (e.g. torchvision's Inception/GoogLeNet return auxiliary logits in train mode: build "
            "them with aux_logits=False)"
        )
    return tracing.valid_cuts(graph, probe)


def _cut_info(node: fx.Node) -> CutInfo:
    meta = node.meta["tensor_meta"]
    path = tracing.module_path(node)
    numel = 1
    for d in meta.shape[1:]:
        numel *= d
    return CutInfo(
        node=node.name,
        module=path[-1][0] if path else "(forward)",
        shape=tuple(meta.shape[1:]),
        bytes_per_example=numel * meta.dtype.itemsize,
    )


def _probe_input(input_shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)


def build(model: nn.Module, plan: CutPlan) -> TracedModel:
    """The segments of ``plan`` over ``model`` itself (tracing is symbolic, so this works under fake tensors)."""
    graphs = {}
    for mode in ("train", "eval"):
        graphs[mode] = extract(model, tracing.trace(model, mode == "train"), plan.ends[mode])
    segments = [TracedSegment(t, e, name) for t, e, name in zip(graphs["train"], graphs["eval"], plan.names)]
    _drop_constants(model)
    return TracedModel(model, segments, plan)


def _drop_constants(model: nn.Module) -> None:
    """fx parks the tensors it captures as constants on the traced root (``_tensor_constant0``…); the segments hold
    their own reference, so take them off the user's model again."""
    for name in [n for n in vars(model) if n.startswith("_tensor_constant")]:
        delattr(model, name)


@torch.no_grad()
def _validate(probe: nn.Module, plan: CutPlan, x: Tensor) -> set[str]:
    """Refuse unless the segments reproduce ``probe``'s forward exactly and partition its used parameters; returns
    the names of the parameters the segments use."""
    traced = build(probe, plan)
    for training in (True, False):
        traced.train(training)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            expected = probe(x)
            torch.manual_seed(0)
            got = x
            for segment in traced.layers:
                got = segment(got)
        if not isinstance(expected, Tensor) or got.shape != expected.shape or not torch.equal(got, expected):
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape differs"
            raise TraceRefused(
                f"{plan.arch} is refused: its {len(plan.names)} traced segments do not reproduce its forward in "
                f"{'train' if training else 'eval'} mode (max abs difference {diff}); train it end to end (K=1)"
            )
    owner: dict[int, int] = {}
    for k, segment in enumerate(traced.layers):
        for p in segment.parameters():
            if id(p) in owner:
                raise TraceRefused(f"{plan.arch} is refused: a parameter is read by segments {owner[id(p)]} and {k}")
            owner[id(p)] = k
    return {name for name, p in probe.named_parameters() if id(p) in owner}


def trace_model(model: nn.Module, input_shape: tuple[int, ...], arch: str | None = None) -> TracedModel:
    """``model`` (any classifier taking one image batch) as a :class:`TracedModel` for inputs of ``input_shape``."""
    plan = plan_cuts(model, tuple(input_shape), arch)
    try:
        return build(model, plan)
    except KeyError:  # a cached plan whose nodes this model's graph lacks (state the cache key cannot see): replan
        _drop_constants(model)
        _PLANS.pop(_plan_key(model, tuple(input_shape)), None)
        return build(model, plan_cuts(model, tuple(input_shape), arch))


def whole_model(model: nn.Module, arch: str | None = None) -> LayeredModel:
    """A model that cannot be traced, as one atomic layer: enough for K=1 (end-to-end training)."""
    return LayeredModel([model], names=[arch or type(model).__name__], stage_of=[0], arch=arch or type(model).__name__)
