"""Forward-time checks that a head or stem declares every tensor it reads that needs a gradient: the reverse
sweep returns gradients only for parameters and declared ``context()`` tensors, so an undeclared one would
silently get none (``mode="store"`` would give it one). Each check costs one step of the module."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_revrnn.core.numerics import AutocastState
from lightning_revrnn.core.protocol import StepHead, StepStem


def trainable(module: nn.Module | None) -> list[Tensor]:
    """Parameters of an optional head or stem that take gradients, in a fixed order."""
    return [] if module is None else [p for p in module.parameters() if p.requires_grad]


def declared_context(module: StepHead | StepStem | None) -> list[Tensor]:
    """The module's declared context tensors that need a gradient."""
    return [] if module is None else [t for t in module.context() if t.requires_grad]


def check_declared_inputs(
    head: StepHead | None, stem: StepStem | None, autocast: AutocastState, x: Tensor, top_size: int
) -> None:
    """Raise if the head or stem reads a tensor that requires grad but is neither its parameter nor in its
    ``context()``: the reverse sweep would return no gradient for it (``mode="store"`` would).

    Costs one step of each: the module runs on a detached one-step input with its parameters detached
    (``functional_call``); whatever still requires grad in the value comes from elsewhere, and the graph
    is walked until it meets a leaf that is not declared. ``top_size``: the top layer's output size.
    """
    with torch.enable_grad():
        if stem is not None:
            frozen = {n: p.detach() for n, p in stem.named_parameters()}
            with autocast.enter():
                value = functional_call(stem, frozen, (x[:1].detach(),))
            _raise_if_undeclared(stem, "StepStem", value, list(stem.context()))
        if head is not None:
            frozen = {n: p.detach() for n, p in head.named_parameters()}
            zeros = torch.zeros(1, x.shape[1], top_size, device=x.device)
            with autocast.enter():
                value = functional_call(head, frozen, (zeros, 0))
            _raise_if_undeclared(head, "StepHead", value, list(head.context()))
            _raise_if_parameter_feeds_context(head, declared_context(head))


#: Graph nodes :func:`_raise_if_parameter_feeds_context` visits at most per context tensor.
CONTEXT_WALK_LIMIT = 10_000


def _raise_if_parameter_feeds_context(head: StepHead, context: list[Tensor]) -> None:
    """Raise if one of the head's own parameters is also an ancestor of one of its context tensors (a source
    embedding read by the head and by the encoder that produced the attention memory): the reverse sweep's
    per-chunk gradient call for the head's parameters would then run that other module's backward (its
    reverse sweep) once per chunk, which it refuses (one backward per forward)."""
    params = {id(p) for p in trainable(head)}
    for tensor in context:
        stack, seen = [tensor.grad_fn], set[int]()
        while stack and len(seen) < CONTEXT_WALK_LIMIT:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if isinstance(variable, Tensor) and id(variable) in params:
                raise RuntimeError(
                    f"StepHead {type(head).__name__}: its parameter of shape {tuple(variable.shape)} also feeds one of "
                    f"its context() tensors (shape {tuple(tensor.shape)}), e.g. a source embedding read by the head "
                    "and by the encoder whose outputs are the attention memory. The reverse sweep forms the head's "
                    "parameter gradients once per chunk and would run the encoder's backward each time. Fix: read "
                    "that parameter in the head through a tensor made before the call (e.g. "
                    "`self.weight_view = embedding.weight[:]`) and list it in context() instead."
                )
            stack.extend(n for n, _ in node.next_functions)


def _raise_if_undeclared(module: nn.Module, kind: str, value: Tensor, declared: list[Tensor]) -> None:
    if not isinstance(value, Tensor) or not value.requires_grad:
        return
    undeclared = _undeclared_leaf(value, declared)
    if undeclared is None:
        return
    name = type(module).__name__
    raise RuntimeError(
        f"{kind} {name} reads a tensor that requires grad but is neither its parameter nor listed by its "
        f"context() (its graph reaches a leaf of shape {tuple(undeclared.shape)}): mode='reverse' would give it "
        "no gradient (mode='store' would). "
        f"Fix: return that tensor (the one the {kind.lower()[4:]} reads, e.g. an attention memory or encoder "
        f"output) from {name}.context(), register it as a parameter of {name}, or detach it if it needs no "
        "gradient."
    )


def _undeclared_leaf(value: Tensor, declared: list[Tensor]) -> Tensor | None:
    """The first leaf tensor the graph of ``value`` reaches without passing through a declared tensor."""
    stops = {id(t.grad_fn) for t in declared if t.grad_fn is not None}
    leaves = {id(t) for t in declared if t.grad_fn is None}
    stack, seen = [value.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stops:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):  # AccumulateGrad: a leaf
            if id(variable) not in leaves:
                return variable
            continue
        stack.extend(n for n, _ in node.next_functions)
    return None
