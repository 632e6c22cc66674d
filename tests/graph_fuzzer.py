"""A generator of small convolutional model DAGs for fuzzing specfx against eager PyTorch.

:func:`graphs` is a hypothesis strategy that draws a :class:`Spec`: a batch of inputs
(1D or 2D, batch 1–3, ≤ 16 channels, spatial ≤ 40) and a list of ops over the values made
so far (``v0`` is the input). Each op reads earlier values — usually the latest, so that
conv → activation → conv chains (what specfx fuses) are common, sometimes an earlier one,
so that branches fork and rejoin through residual adds and concatenations:

- convolutions (``nn.Conv1d``/``nn.Conv2d`` modules, ``F.convNd`` and ``torch.convNd``
  calls): kernel 1..15 per axis, stride 1..3, dilation 1..3, padding as an int, a tuple,
  ``'same'`` or ``'valid'``, padding modes zeros/circular/reflect/replicate where torch
  accepts them, dense, grouped and depthwise (channel multiplier 1 or 2), with or
  without bias;
- activations ReLU/GELU (exact and tanh)/SiLU/Tanh/LeakyReLU as modules, ``F`` calls,
  ``torch`` calls and tensor methods, and their in-place forms (``nn.ReLU(inplace=True)``,
  ``F.relu(x, inplace=True)``, ``x.relu_()``, ``x.tanh_()``, …), squares (``x * x``);
- in-place arithmetic (``x.mul_(2)``, ``x.add_(1)``, ``x.add_(y)``) on values that other
  ops also read, before or after the write;
- eval-mode BatchNorm (module or ``F.batch_norm``) with non-trivial running statistics and
  affine parameters; scalar and per-channel affine maps;
- residual adds of equal-shape values, ``torch.cat`` on channels, crops
  (``x[..., :n]``), average and max pooling (modules and ``F`` calls), global average
  pooling.

:func:`build` turns a spec into an ``nn.Module`` whose ``forward`` is generated Python
source (so ``torch.fx.symbolic_trace`` records every call), and :func:`render` gives that
source as a standalone script — the reproducer to paste when an example fails.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

MAX_CHANNELS = 16
MAX_SIZE = 40

# value shape: (channels, spatial sizes)
Shape = tuple[int, tuple[int, ...]]


@dataclasses.dataclass
class Op:
    """One line of the forward: ``out = <expr>``. ``init`` holds the lines that create its
    submodule or parameters in ``__init__`` (``{n}`` is the op's index)."""

    expr: str
    init: list[str]
    inputs: list[int]
    shape: Shape
    alias: Optional[int] = None   # an in-place op returns (and writes) this value


@dataclasses.dataclass
class Spec:
    rank: int
    batch: int
    channels: int
    size: tuple[int, ...]
    seed: int
    ops: list[Op]
    outputs: list[int]

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return "\n" + render(self)


# --- drawing ops -------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tup(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else str(tuple(values))


@st.composite
def _conv(draw, rank: int, shape: Shape) -> Op:
    cin, size = shape
    style = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
    if style == "depthwise":
        mult = draw(st.sampled_from([m for m in (1, 2) if cin * m <= MAX_CHANNELS]))
        cout, groups = cin * mult, cin
    else:
        cout = draw(st.integers(1, MAX_CHANNELS))
        common = [g for g in _divisors(math.gcd(cin, cout))]
        groups = draw(st.sampled_from(common)) if style == "grouped" else 1
    square = rank == 1 or draw(st.booleans())
    kernel = [draw(st.integers(1, 15))] * rank if square else [draw(st.integers(1, 15)) for _ in range(rank)]
    dilation = [draw(st.integers(1, 3))] * rank if draw(st.booleans()) else [draw(st.integers(1, 3)) for _ in range(rank)]
    stride = [draw(st.integers(1, 3))] * rank if draw(st.booleans()) else [draw(st.integers(1, 3)) for _ in range(rank)]
    kinds = ["int", "int", "valid"] + (["same", "same"] if all(s == 1 for s in stride) else [])
    kind = draw(st.sampled_from(kinds))
    mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "circular", "reflect", "replicate"]))

    # Shrink the kernel where it would not fit ('valid': the input; else input + 2·pad ≤ 2·span).
    for axis in range(rank):
        if kind == "valid":
            while dilation[axis] * (kernel[axis] - 1) + 1 > size[axis]:
                if dilation[axis] > 1:
                    dilation[axis] -= 1
                else:
                    kernel[axis] -= 1
    span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    if kind == "int":
        pads = []
        for axis in range(rank):
            low = max(0, -(-(span[axis] - size[axis]) // 2))
            high = max(low, min(span[axis] - 1, (39 * stride[axis] + span[axis] - size[axis]) // 2))
            pads.append(draw(st.integers(low, high)))
        if len(set(pads)) == 1 and draw(st.booleans()):
            padding: Any = pads[0]
        else:
            padding = tuple(pads)
        left = right = pads
    elif kind == "same":
        padding = "same"
        left = [(s - 1) // 2 for s in span]
        right = [s - 1 - l for s, l in zip(span, left)]
    else:
        padding = "valid"
        left = right = [0] * rank
    if mode == "reflect" and any(max(l, r) >= n for l, r, n in zip(left, right, size)):
        mode = "zeros"
    if mode == "circular" and any(max(l, r) > n for l, r, n in zip(left, right, size)):
        mode = "zeros"
    out = tuple((n + l + r - s) // st_ + 1 for n, l, r, s, st_ in zip(size, left, right, span, stride))
    assert all(1 <= o <= MAX_SIZE for o in out), (size, kernel, dilation, stride, padding, out)
    bias = draw(st.booleans())
    form = "module" if mode != "zeros" else draw(st.sampled_from(["module", "module", "F", "torch"]))
    ks, ss, ds = _tup(tuple(kernel)), _tup(tuple(stride)), _tup(tuple(dilation))
    pad = repr(padding)
    if form == "module":
        init = [f"self.conv{{n}} = nn.Conv{rank}d({cin}, {cout}, {ks}, stride={ss}, padding={pad}, "
                f"dilation={ds}, groups={groups}, bias={bias}, padding_mode={mode!r})"]
        expr = "self.conv{n}({0})"
    else:
        init = [f"self.w{{n}} = nn.Parameter(torch.randn({cout}, {cin // groups}, {', '.join(map(str, kernel))}) "
                f"/ {math.sqrt(cin // groups * math.prod(kernel)):.4f})"]
        init.append(f"self.b{{n}} = nn.Parameter(torch.randn({cout}) * 0.1)" if bias else "self.b{n} = None")
        fn = f"F.conv{rank}d" if form == "F" else f"torch.conv{rank}d"
        expr = f"{fn}({{0}}, self.w{{n}}, self.b{{n}}, {ss}, {pad}, {ds}, {groups})"
    return Op(expr, init, [], (cout, out))


_ACTS = {
    # name: (module, functional, in-place forms)
    "relu": (["nn.ReLU()", "nn.ReLU(inplace=True)"], ["F.relu({0})", "torch.relu({0})", "{0}.relu()"],
             ["F.relu({0}, inplace=True)", "{0}.relu_()", "torch.relu_({0})"]),
    "gelu": (["nn.GELU()", "nn.GELU(approximate='tanh')"], ["F.gelu({0})", "F.gelu({0}, approximate='tanh')"], []),
    "silu": (["nn.SiLU()", "nn.SiLU(inplace=True)"], ["F.silu({0})"], ["F.silu({0}, inplace=True)"]),
    "tanh": (["nn.Tanh()"], ["torch.tanh({0})", "{0}.tanh()"], ["{0}.tanh_()"]),
    "leaky_relu": (["nn.LeakyReLU(0.1)", "nn.LeakyReLU(0.2, inplace=True)"], ["F.leaky_relu({0}, 0.05)"],
                   ["F.leaky_relu({0}, 0.1, inplace=True)"]),
    "square": ([], ["{0} * {0}"], []),
}


@st.composite
def _activation(draw, shape: Shape) -> Op:
    name = draw(st.sampled_from(["relu", "relu", "gelu", "silu", "tanh", "leaky_relu", "square"]))
    modules, functions, inplace = _ACTS[name]
    choices = [("module", m) for m in modules] + [("fn", f) for f in functions] + [("inplace", f) for f in inplace]
    form, text = draw(st.sampled_from(choices))
    if form == "module":
        writes = "inplace=True" in text
        return Op("self.act{n}({0})", [f"self.act{{n}} = {text}"], [], shape, alias=0 if writes else None)
    if name == "square":
        return Op("{0} * {0}", [], [], shape)
    return Op(text, [], [], shape, alias=0 if form == "inplace" else None)


@st.composite
def _batch_norm(draw, rank: int, shape: Shape) -> Op:
    c = shape[0]
    lines = ["torch.nn.init.uniform_({t}.running_mean, -0.5, 0.5)", "torch.nn.init.uniform_({t}.running_var, 0.25, 2.0)",
             "torch.nn.init.uniform_({t}.weight, 0.5, 1.5)", "torch.nn.init.uniform_({t}.bias, -0.5, 0.5)"]
    if draw(st.booleans()):
        init = [f"self.bn{{n}} = nn.BatchNorm{rank}d({c})"] + [line.format(t="self.bn{n}") for line in lines]
        return Op("self.bn{n}({0})", init, [], shape)
    init = [f"self.register_buffer('mean{{n}}', torch.rand({c}) - 0.5)",
            f"self.register_buffer('var{{n}}', torch.rand({c}) * 1.75 + 0.25)",
            f"self.gamma{{n}} = nn.Parameter(torch.rand({c}) + 0.5)",
            f"self.beta{{n}} = nn.Parameter(torch.rand({c}) - 0.5)"]
    return Op("F.batch_norm({0}, self.mean{n}, self.var{n}, self.gamma{n}, self.beta{n})", init, [], shape)


@st.composite
def _affine(draw, rank: int, shape: Shape) -> Op:
    c = shape[0]
    form = draw(st.sampled_from(["mul", "add", "div", "rmul", "channel"]))
    if form == "channel":
        ones = ", 1" * rank
        return Op("{0} * self.gain{n} + self.shift{n}",
                  [f"self.gain{{n}} = nn.Parameter(torch.rand(1, {c}{ones}) + 0.5)",
                   f"self.shift{{n}} = nn.Parameter(torch.rand(1, {c}{ones}) - 0.5)"], [], shape)
    return Op({"mul": "{0} * 0.5", "add": "{0} + 0.25", "div": "{0} / 2.0", "rmul": "1.5 * {0}"}[form], [], [], shape)


@st.composite
def _pool(draw, rank: int, shape: Shape) -> Op:
    c, size = shape
    kind = draw(st.sampled_from(["avg", "avg", "max", "global"]))
    if kind == "global":
        dims = tuple(range(-rank, 0))
        expr = draw(st.sampled_from([f"F.adaptive_avg_pool{rank}d({{0}}, 1)", f"{{0}}.mean({dims}, keepdim=True)"]))
        return Op(expr, [], [], (c, (1,) * rank))
    k = draw(st.integers(1, 3))
    s = draw(st.integers(1, 2))
    p = draw(st.integers(0, k // 2))
    k = min(k, min(size) + 2 * p)
    p = min(p, k // 2)
    out = tuple((n + 2 * p - k) // s + 1 for n in size)
    name = "AvgPool" if kind == "avg" else "MaxPool"
    if draw(st.booleans()):
        return Op("self.pool{n}({0})", [f"self.pool{{n}} = nn.{name}{rank}d({k}, stride={s}, padding={p})"], [], (c, out))
    fn = f"F.{kind}_pool{rank}d"
    return Op(f"{fn}({{0}}, {k}, {s}, {p})", [], [], (c, out))


@st.composite
def _crop(draw, rank: int, shape: Shape) -> Op:
    c, size = shape
    stops = [draw(st.integers(1, n)) for n in size]
    index = ", ".join(f":{n}" for n in stops)
    expr = draw(st.sampled_from([f"{{0}}[..., {index}]", f"{{0}}[:, :, {index}]"]))
    return Op(expr, [], [], (c, tuple(stops)))


@st.composite
def graphs(draw, max_ops: int = 8) -> Spec:
    """A random model DAG and its input (see the module docstring)."""
    rank = draw(st.sampled_from([1, 2]))
    batch = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 8))
    size = tuple(draw(st.integers(1, MAX_SIZE if rank == 1 else 24)) for _ in range(rank))
    seed = draw(st.integers(0, 2**16))
    shapes: list[Shape] = [(channels, size)]
    ops: list[Op] = []
    n_ops = draw(st.integers(2, max_ops))

    def pick(fresh: bool = True) -> int:
        if fresh and draw(st.integers(0, 9)) < 7:
            return len(shapes) - 1
        return draw(st.integers(0, len(shapes) - 1))

    for i in range(n_ops):
        kind = "conv" if i == 0 and draw(st.integers(0, 4)) else draw(st.sampled_from(
            ["conv"] * 5 + ["act"] * 4 + ["bn", "bn", "affine", "pool", "crop", "add", "add", "cat", "inplace"]))
        a = pick()
        if kind == "conv":
            op = draw(_conv(rank, shapes[a]))
        elif kind == "act":
            op = draw(_activation(shapes[a]))
        elif kind == "bn":
            op = draw(_batch_norm(rank, shapes[a]))
        elif kind == "affine":
            op = draw(_affine(rank, shapes[a]))
        elif kind == "pool":
            op = draw(_pool(rank, shapes[a]))
        elif kind == "crop":
            op = draw(_crop(rank, shapes[a]))
        elif kind in ("add", "cat"):
            if kind == "add":
                same = [j for j, s in enumerate(shapes) if s == shapes[a]]
            else:
                same = [j for j, s in enumerate(shapes)
                        if s[1] == shapes[a][1] and s[0] + shapes[a][0] <= MAX_CHANNELS]
            if not same:
                op = draw(_activation(shapes[a]))
            else:
                b = draw(st.sampled_from(same))
                if kind == "add":
                    expr = draw(st.sampled_from(["{0} + {1}", "torch.add({0}, {1})", "{0}.add_({1})"]))
                    op = Op(expr, [], [a, b], shapes[a], alias=0 if "add_" in expr else None)
                else:
                    op = Op("torch.cat([{0}, {1}], dim=1)", [], [a, b], (shapes[a][0] + shapes[b][0], shapes[a][1]))
        else:  # in-place arithmetic on a value that is (or will be) read elsewhere
            expr = draw(st.sampled_from(["{0}.mul_(2)", "{0}.add_(1)", "{0}.mul_(-0.5)", "{0}.sub_(0.25)"]))
            a = pick(fresh=False)
            op = Op(expr, [], [a], shapes[a], alias=0)
        if not op.inputs:
            op.inputs = [a]
        if op.alias is not None:
            op.alias = op.inputs[op.alias]
        ops.append(op)
        shapes.append(op.shape)
    # Usually every value nothing reads is an output (so no branch is dead code);
    # sometimes only the last value is (dead branches, in-place writes DCE must keep).
    outputs = [len(shapes) - 1]
    if draw(st.integers(0, 3)):
        read = {i for op in ops for i in op.inputs}
        written = {op.alias for op in ops if op.alias is not None}
        outputs += [n for n, op in enumerate(ops, start=1)
                    if n not in read and op.alias is None and n != len(shapes) - 1][:3]
        if written and draw(st.booleans()):
            outputs.append(min(written))
    return Spec(rank, batch, channels, size, seed, ops, outputs)


# --- building ----------------------------------------------------------------------------

def _sources(spec: Spec) -> tuple[list[str], list[str]]:
    init, forward = [], []
    for n, op in enumerate(spec.ops, start=1):
        init += [line.replace("{n}", str(n)) for line in op.init]
        args = [f"v{i}" for i in op.inputs]
        expr = op.expr.replace("{n}", str(n))
        for j, name in enumerate(args):
            expr = expr.replace("{%d}" % j, name)
        forward.append(f"v{n} = {expr}")
    outs = [f"v{i}" for i in spec.outputs]
    forward.append(f"return {outs[0]}" if len(outs) == 1 else f"return ({', '.join(outs)})")
    return init, forward


def render(spec: Spec) -> str:
    """A standalone script that builds the spec's model and input (the reproducer)."""
    init, forward = _sources(spec)
    body = "\n".join("        " + line for line in init) or "        pass"
    fwd = "\n".join("        " + line for line in forward)
    shape = (spec.batch, spec.channels, *spec.size)
    return (
        "import torch, torch.nn as nn, torch.nn.functional as F\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        f"{body}\n"
        "    def forward(self, v0):\n"
        f"{fwd}\n"
        f"torch.manual_seed({spec.seed})\n"
        f"model = Net().eval()\n"
        f"x = torch.randn{shape}\n")


def build(spec: Spec) -> tuple[nn.Module, torch.Tensor]:
    """The spec's model (in eval mode) and input, built exactly as :func:`render`'s script."""
    namespace: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        exec(compile(render(spec), "<graph_fuzzer>", "exec"), namespace)
    return namespace["model"], namespace["x"]
