"""Placement: which members of a chain run in the frequency domain (F) and which
spatially (S), by an exact min-cut over the cost model; and the grids a chain may run on.

An anchor is F (its channel contraction); a node outside the chain is S. Costs
(``specfx.cost_model`` chain functions, at the chain's grid): each node's own cost in the
domain it runs in (an exact spectral activation costs a transform pair, a poly one its
spectral convolutions, a spatial ReLU one pass over memory); a forward transform for each
tensor that is S but read by an F node, an inverse transform for each tensor that is F
but read spatially (by an S node, by anything outside the chain, or as a graph output) —
once per tensor however many readers it has. Minimizing the sum is a two-label problem
with only "different labels" pair terms, which is a minimum s–t cut: source = F, sink =
S; node ``v``: edges ``s→v`` (capacity = its S cost) and ``v→t`` (its F cost); per tensor
``u`` two auxiliaries, ``u_F`` ("u is available as a spectrum": ``v→u_F`` infinite for
every F reader v, ``u_F→u`` = forward transform) and ``u_S`` ("u is available
spatially": ``u_S→v`` infinite for every reader v that is S, ``u→u_S`` = inverse
transform). ``networkx.minimum_cut`` solves it exactly; a tensor with readers in both
domains is materialized (transformed once) and both keep it.

The labelling is then checked by :func:`.support.check`; the masks it adds are costed.

Pure functions of :mod:`.chain` data and the cost model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import networkx as nx

from specfx import cost_model as cm
from specfx.geometry import smooth_size

from .chain import Chain
from .recognize import OpKind
from .support import check

SOURCE, SINK = "__spectral__", "__spatial__"


@dataclasses.dataclass
class Candidate:
    grid: tuple[int, ...]
    labels: dict[str, str]              # node -> "F" | "S"
    modes: dict[str, str]               # activation -> "exact" | "poly"
    masks: list[tuple[str, str]]
    poly_mask: dict[str, bool]
    cost_ms: float
    transforms: dict[str, int]
    ok: bool
    reason: str = ""
    exact_ms: float = 0.0  # the same labelling with exact spectral activations only


@dataclasses.dataclass
class Placement:
    """One chain's costs and labellings. ``poly_degrees``: the degree of each activation
    that has a polynomial (offered to the min-cut when ``spectral_activation`` is
    ``"poly"``; always taken under ``policy="always"``)."""

    chain: Chain
    element_bytes: int
    profile: cm.CostProfile
    spectral_activation: str = "exact"
    policy: str = "auto"
    poly_degrees: dict[str, int] = dataclasses.field(default_factory=dict)

    def forced(self, name: str) -> Optional[str]:
        """Anchors: F when their output continues as a spectrum, else S (a strided conv
        still reads a spectrum, and costs its own inverse transform)."""
        m = self.chain.members[name]
        if m.anchor:
            return "F" if m.continues else "S"
        return None

    def _activation_f_cost(self, name: str, grid) -> tuple[float, str]:
        m = self.chain.members[name]
        exact = cm.exact_activation_ms(m.rows_out, grid, m.size_out, self.element_bytes, self.profile)
        degree = self.poly_degrees.get(name)
        if self.spectral_activation != "poly" or degree is None:
            return exact, "exact"
        # (an input mask, if the analysis finds one needed, is costed afterwards)
        poly = cm.poly_activation_ms(m.rows_out, grid, self.element_bytes, degree, False, self.profile)
        if self.policy == "always" or poly < exact:
            return poly, "poly"
        return exact, "exact"

    def unary(self, name: str, grid) -> tuple[float, Optional[float], Optional[str]]:
        """(S cost, F cost, activation mode) of a chain member."""
        m, p, eb = self.chain.members[name], self.profile, self.element_bytes
        if m.anchor:
            mix = cm.chain_mix_ms(m.shape, grid, p)
            if not m.continues:
                mix += cm.inverse_transform_ms(m.rows_out, grid, m.size_out, eb, p)
            return mix, mix, None
        if m.kind is OpKind.ACTIVATION:
            f, mode = self._activation_f_cost(name, grid)
            return cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 2, p), f, mode
        if m.kind is OpKind.AFFINE:
            return (cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 2, p),
                    cm.spectral_pointwise_ms(m.rows_out, grid, eb, 1, p), None)
        if m.kind is OpKind.ADD:
            return (cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 3, p),
                    cm.spectral_pointwise_ms(m.rows_out, grid, eb, 3, p), None)
        if m.kind is OpKind.IDENTITY:
            return 0.0, 0.0, None
        if m.kind is OpKind.CROP:
            return cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 2, p), 0.0, None
        if m.kind is OpKind.POOL:
            s = cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 2 + math.prod(m.kernel) // 4, p)
            return s, cm.chain_mix_ms(m.shape, grid, p), None
        return cm.direct_conv_ms(m.shape, p), cm.chain_mix_ms(m.shape, grid, p), None

    def mode_cost(self, name: str, mode: str, grid, mask_input: bool = False) -> float:
        m = self.chain.members[name]
        if mode == "poly":
            return cm.poly_activation_ms(m.rows_out, grid, self.element_bytes, self.poly_degrees[name],
                                         mask_input, self.profile)
        return cm.exact_activation_ms(m.rows_out, grid, m.size_out, self.element_bytes, self.profile)

    def evaluate(self, labels: dict[str, str], modes: dict[str, str], grid) -> tuple[float, dict[str, int]]:
        """Cost and transform counts of a labelling (masks excluded): what the min-cut
        minimizes."""
        chain, p, eb = self.chain, self.profile, self.element_bytes
        cost, fwd, inv = 0.0, 0, 0
        for n in chain.comp:
            m = chain.members[n]
            s_cost, f_cost, _ = self.unary(n, grid)
            if m.anchor:
                cost += f_cost
                inv += 0 if m.continues else 1
            elif labels[n] == "F":
                if m.kind is OpKind.ACTIVATION:
                    mode = modes.get(n, "exact")
                    f_cost = self.mode_cost(n, mode, grid)
                    if mode == "exact":
                        fwd, inv = fwd + 1, inv + 1
                cost += f_cost
            else:
                cost += s_cost
        for t in chain.read_tensors():
            if chain.spectral_readers(t, labels) and labels.get(t, "S") == "S":
                cost += cm.forward_transform_ms(chain.rows_and_size(t)[0], grid, eb, p)
                fwd += 1
        for n in chain.produced_tensors():
            if labels[n] == "F" and chain.spatial_readers(n, labels):
                rows, size = chain.rows_and_size(n)
                cost += cm.inverse_transform_ms(rows, grid, size, eb, p)
                inv += 1
        return cost, {"forward": fwd, "inverse": inv}

    def min_cut(self, grid, spatial: frozenset = frozenset()) -> tuple[dict[str, str], dict[str, str], float]:
        """The cheapest labelling, by ``networkx.minimum_cut`` (the nodes in ``spatial``
        forced S)."""
        chain, eb, p = self.chain, self.element_bytes, self.profile
        h = nx.DiGraph()
        h.add_node(SOURCE)
        h.add_node(SINK)
        modes: dict[str, str] = {}
        for n in chain.comp:
            s_cost, f_cost, mode = self.unary(n, grid)
            if mode is not None:
                modes[n] = mode
            forced = self.forced(n)
            if forced == "F":
                h.add_edge(SOURCE, n)
            else:
                h.add_edge(SOURCE, n, capacity=s_cost)
            if forced == "S" or f_cost is None or n in spatial:
                h.add_edge(n, SINK)
            else:
                h.add_edge(n, SINK, capacity=f_cost)
        for t in chain.read_tensors():
            if t not in chain.set:
                h.add_edge(t, SINK)  # outside the chain: spatial
            uf = ("F", t)
            h.add_edge(uf, t, capacity=cm.forward_transform_ms(chain.rows_and_size(t)[0], grid, eb, p))
            for r in chain.readers_of(t)[0]:
                if chain.members[r].anchor and not chain.members[r].continues:
                    h.add_edge(SOURCE, uf)
                else:
                    h.add_edge(r, uf)
        for n in chain.produced_tensors():
            rows, size = chain.rows_and_size(n)
            us = ("S", n)
            h.add_edge(n, us, capacity=cm.inverse_transform_ms(rows, grid, size, eb, p))
            readers, outside = chain.readers_of(n)
            if outside:
                h.add_edge(us, SINK)
            for r in readers:
                if not chain.members[r].anchor:
                    h.add_edge(us, r)
        value, (spectral_side, _) = nx.minimum_cut(h, SOURCE, SINK)
        labels = {n: ("F" if n in spectral_side else "S") for n in chain.comp}
        return labels, modes, value

    def all_spectral(self, grid) -> tuple[dict[str, str], dict[str, str]]:
        labels, modes = {}, {}
        for n in self.chain.comp:
            _, _, mode = self.unary(n, grid)
            labels[n] = self.forced(n) or "F"
            if mode is not None:
                modes[n] = mode
        return labels, modes

    def solve(self, grid, always: bool) -> Candidate:
        """The best labelling at ``grid``: every op spectral under ``always``; else the
        min-cut, and again with the ops whose outputs needed a mask forced spatial (the
        min-cut does not see masks) while that is cheaper."""
        best = self._solve(grid, always, frozenset())
        spatial: frozenset = frozenset()
        for _ in range(3):
            if always or not best.masks:
                break
            spatial = spatial | {o for _, o in best.masks if o in self.chain.set and not self.chain.members[o].anchor}
            again = self._solve(grid, always, spatial)
            if not again.ok or (best.ok and again.cost_ms >= best.cost_ms):
                break
            best = again
        return best

    def _solve(self, grid, always: bool, spatial: frozenset) -> Candidate:
        labels, modes = self.all_spectral(grid) if always else self.min_cut(grid, spatial)[:2]
        poly_mask = {n: False for n, md in modes.items() if md == "poly" and labels[n] == "F"}
        result = check(self.chain, labels, modes, grid, poly_mask)
        for _ in range(3):
            changed = False
            for consumer, operand in list(result.masks):
                for p in self._poly_sources(operand, labels, modes):
                    if not poly_mask[p]:
                        poly_mask[p] = changed = True
            if not changed:
                break
            result = check(self.chain, labels, modes, grid, poly_mask)
        modes = {n: md for n, md in modes.items() if labels[n] == "F"}
        cost, transforms = self.evaluate(labels, modes, grid)
        for n, on in poly_mask.items():
            cost += self.mode_cost(n, "poly", grid, on) - self.mode_cost(n, "poly", grid, False)
        mask_ms = 0.0
        for consumer, _ in result.masks:
            rows, size = self.chain.rows_and_size(self.chain.members[consumer].inputs[0])
            mask_ms += cm.exact_activation_ms(rows, grid, size, self.element_bytes, self.profile)
            transforms = {"forward": transforms["forward"] + 1, "inverse": transforms["inverse"] + 1}
        exact_ms = self.evaluate(labels, {n: "exact" for n in modes}, grid)[0] + mask_ms
        return Candidate(grid, labels, modes, result.masks, poly_mask, cost + mask_ms, transforms, result.ok,
                         result.reason, exact_ms)

    def _poly_sources(self, name: str, labels, modes) -> list[str]:
        """Poly activations whose output reaches ``name`` through spectral linear ops."""
        found, stack, seen = [], [name], set()
        while stack:
            n = stack.pop()
            if n in seen or n not in self.chain.set or labels.get(n) != "F":
                continue
            seen.add(n)
            m = self.chain.members[n]
            if m.kind is OpKind.ACTIVATION:
                if modes.get(n) == "poly":
                    found.append(n)
                continue
            if m.kind.linear:
                stack += list(m.inputs)
        return found

    def per_conv(self, grid) -> tuple[float, dict[str, int]]:
        """Each anchor lowered on its own grid, everything between them spatial."""
        chain, p, eb, cost = self.chain, self.profile, self.element_bytes, 0.0
        anchors = [n for n in chain.comp if chain.members[n].anchor]
        for n in anchors:
            m = chain.members[n]
            cost += (cm.forward_transform_ms(m.rows_in, m.own_grid, eb, p) + cm.chain_mix_ms(m.shape, m.own_grid, p)
                     + cm.inverse_transform_ms(m.rows_out, m.own_grid, m.size_out, eb, p))
        for n in chain.comp:
            if not chain.members[n].anchor:
                cost += self.unary(n, grid)[0]
        return cost, {"forward": len(anchors), "inverse": len(anchors)}


def grids(chain: Chain, circular: bool) -> list[tuple[int, ...]]:
    """The grids worth trying: the largest of the anchors' own grids (grown to hold every
    tensor), and one large enough that no support wraps (``L + Σ spans``), which causal
    chains need to run without masks. A circular chain has the one period."""
    members, rank = chain.members, chain.rank
    anchors = [members[n] for n in chain.comp if members[n].anchor]
    if circular:
        return [tuple(next(a for a in anchors if not a.pointwise).own_grid)]
    sizes = [chain.rows_and_size(n)[1] for n in chain.comp if members[n].continues]
    sizes += [chain.rows_and_size(i)[1] for n in chain.comp for i in members[n].inputs]
    own = [max(a.own_grid[axis] for a in anchors) for axis in range(rank)]
    largest = [max(s[axis] for s in sizes) for axis in range(rank)]
    spans = [sum(members[n].dilation[axis] * (members[n].kernel[axis] - 1)
                 for n in chain.comp if members[n].kind.windowed) for axis in range(rank)]
    # (the last axis even, as plan_geometry makes it)
    first = tuple(own[a] if own[a] >= largest[a] else smooth_size(largest[a], even=a == rank - 1)
                  for a in range(rank))
    wide = tuple(max(first[a], smooth_size(largest[a] + spans[a], even=a == rank - 1)) for a in range(rank))
    return [first] if wide == first else [first, wide]
