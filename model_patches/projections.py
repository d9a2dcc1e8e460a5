"""One GEMM for the projections that read the same input: q/k/v of attention, gate/up of the MLP.

At decode batch sizes every projection is a small memory-bound GEMM, and each launch costs a
fixed ramp-up that a 1-8 MB weight (k_proj, v_proj of a GQA model) cannot hide. Inside
:func:`fused_projections` each group runs as one GEMM over its weights stored back to back::

    before                                  inside the context
    q_proj(x)  -> GEMM over Wq              q_proj(x) -> GEMM over [Wq; Wk; Wv] (one launch),
    k_proj(x)  -> GEMM over Wk                           returns its slice
    v_proj(x)  -> GEMM over Wv              k_proj(x), v_proj(x) -> slices of that result

The weights are moved once into one buffer per group (``param.data`` becomes a row slice of it:
same Parameter objects, names, values and memory) and stay there, so later calls reuse it without
copying and a captured CUDA graph stays valid. The modules themselves are swapped only for the
duration of the context: afterwards the model has its own ``nn.Linear`` modules back.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PROJECTION_GROUPS", "fused_projections"]

# Sibling projections that transformers' LLaMA-family layers apply to one input, in call order.
PROJECTION_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """The fused weight of one group and the result its first member computed for the others."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: Sequence[int]) -> None:
        self.weight = weight  # [sum(sizes), in_features]
        self.bias = bias  # [sum(sizes)] or None
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None


class _FusedMember(nn.Module):
    """Stands in for one ``nn.Linear`` of a group; registers the same Parameter objects."""

    def __init__(self, linear: nn.Linear, group: _Group, index: int) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group = group
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] (a strided slice of the group's output)."""
        group = self.group
        start, end = group.bounds[self.index]
        if self.index == 0:
            output = F.linear(x, group.weight, group.bias)  # [..., sum(sizes)]
            group.input, group.output = x, output
            return output[..., start:end]
        if group.input is x and group.output is not None:
            output = group.output
            if self.index == len(group.bounds) - 1:
                group.input = group.output = None  # do not keep the activation alive
            return output[..., start:end]
        # called on its own (not right after the group's first member on the same input)
        return F.linear(x, self.weight, self.bias)


# first linear of a group -> its members, reused by later contexts so that compiled code guarded
# on these objects (torch.compile) stays valid across calls
_members: "weakref.WeakKeyDictionary[nn.Module, list[_FusedMember]]" = weakref.WeakKeyDictionary()


def _group_members(linears: Sequence[nn.Linear]) -> list[_FusedMember]:
    members = _members.get(linears[0])
    if members is not None and all(m.weight is l.weight and m.bias is l.bias for m, l in zip(members, linears)):
        group = members[0].group
        if group.weight.data_ptr() == linears[0].weight.data_ptr() and _stored_back_to_back(
                [linear.weight for linear in linears]):
            return members
    weight = _joined([linear.weight for linear in linears])
    bias = _joined([linear.bias for linear in linears]) if linears[0].bias is not None else None
    group = _Group(weight, bias, [linear.out_features for linear in linears])
    members = [_FusedMember(linear, group, index) for index, linear in enumerate(linears)]
    _members[linears[0]] = members
    return members


def _fusable(linears: Sequence[object]) -> bool:
    if not all(type(linear) is nn.Linear for linear in linears):  # subclasses: quantised, LoRA, ...
        return False
    first = linears[0]
    for linear in linears:
        if linear._forward_hooks or linear._forward_pre_hooks:  # offloading / adapter hooks
            return False
        if (linear.in_features != first.in_features or linear.weight.dtype != first.weight.dtype
                or linear.weight.device != first.weight.device or linear.weight.device.type == "meta"
                or (linear.bias is None) != (first.bias is None)):
            return False
    return True


def _stored_back_to_back(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        if t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def _joined(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """One tensor whose consecutive slices along dim 0 are ``params`` (moved there on first use)."""
    tensors = [p.data for p in params]
    if not _stored_back_to_back(tensors):
        joined = torch.cat(tensors, dim=0)
        start = 0
        for p in params:
            p.data = joined[start:start + p.shape[0]]
            start += p.shape[0]
        tensors = [p.data for p in params]
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


@contextlib.contextmanager
def fused_projections(model: nn.Module) -> Iterator[int]:
    """Run each group of sibling projections of ``model`` as one GEMM while the context is open.

    Groups are :data:`PROJECTION_GROUPS` found as attributes of one module (attention, MLP) that
    are plain ``nn.Linear`` with one input size, dtype and device and no hooks; anything else
    (quantised or adapted layers, Phi-3's already fused ``qkv_proj``) is left alone. Yields the
    number of groups fused. Outputs equal the separate projections up to GEMM rounding.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    groups = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for names in PROJECTION_GROUPS:
                linears = [getattr(module, name, None) for name in names]
                if not _fusable(linears):
                    continue
                groups += 1
                for name, linear, member in zip(names, linears, _group_members(linears)):
                    setattr(module, name, member)
                    swapped.append((module, name, linear))
    try:
        yield groups
    finally:
        for module, name, linear in swapped:
            setattr(module, name, linear)
