"""The two routes by which the spectral ops are registered (specfx/ops/library.py): the
fast dispatcher route where torch has its private pieces, and ``torch.library.custom_op``
otherwise or when ``SPECFX_PUBLIC_LIBRARY=1`` forces it. Also the planner's independence
from the ops (it reads rates, not kernels)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch

import specfx
from specfx.ops import library

ROOT = Path(__file__).resolve().parents[1]

# Run under SPECFX_PUBLIC_LIBRARY=1 in a fresh interpreter (the route is chosen at import):
# opcheck of every op of a lowered conv, a lowered model's forward and backward against
# torch's, and the gradient of the gradient.
PUBLIC_ROUTE_SCRIPT = """
import torch
import specfx
from specfx.ops import library
from conftest import assert_scaled_close
from test_spectral_ops import OP_CASES, op_arguments

assert library.ROUTE == "custom_op", library.ROUTE
assert library.ROUTE_REASONS == ["SPECFX_PUBLIC_LIBRARY is set"], library.ROUTE_REASONS
for case in ("dense_2d_bias_fp32", "strided_dilated_1d_bias_fp64"):
    for name, args in op_arguments(OP_CASES[case]).items():
        torch.library.opcheck(getattr(torch.ops.specfx, name), args)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 31, padding=15), torch.nn.ReLU()).double()
x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
fast = specfx.optimize(model, (x.detach(),), policy="always")
assert torch.ops.specfx.lowered_conv.default in [n.target for n in fast.graph.nodes]
expected = model(x)
grads = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
actual = fast(x)
assert_scaled_close(actual, expected)
for g, e in zip(torch.autograd.grad(actual.square().sum(), [x, *fast.parameters()]), grads):
    assert_scaled_close(g, e)

w = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
xs = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
assert torch.autograd.gradgradcheck(
    lambda x, w: torch.ops.specfx.lowered_conv(x, w, None, [12], [16], [1], [2], 1, [12], [1], torch.float64),
    (xs, w))
# A result that is a view of the kernel's temporary (a full-size crop) takes in-place ops
# under autograd.
y_hat = torch.ops.specfx.to_spectrum(torch.randn(1, 2, 8), [8], [8]).requires_grad_()
torch.ops.specfx.from_spectrum(y_hat, [8], [8], [1], None, torch.float32).relu_().sum().backward()
print("public route ok")
"""


def test_default_route_is_the_dispatcher_one():
    """This torch has every private piece, so the ops take the fast route."""
    assert library.ROUTE == "dispatcher" and library.ROUTE_REASONS == []
    assert library._private_route_missing() == []
    assert isinstance(specfx.ops.lowered_conv, library._DispatcherOp)


def test_public_route_when_forced():
    env = {**os.environ, "SPECFX_PUBLIC_LIBRARY": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", PUBLIC_ROUTE_SCRIPT], cwd=ROOT / "tests", env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "public route ok" in result.stdout


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports, relative ones resolved against the ``specfx`` package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "specfx." * (node.level > 0) + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}".replace("specfx..", "specfx.") for alias in node.names)
    return names


def test_planning_modules_import_no_kernels_and_no_cycle():
    """The cost model reads rates; neither it, the GPU defaults nor the rates import the
    ops package (whose import registers every kernel), and the GPU defaults do not import
    the cost model back."""
    planning = {name: _imports(ROOT / "specfx" / f"{name}.py") for name in ("cost_model", "gpu_costs", "rates")}
    for name, imported in planning.items():
        assert not any(m == "specfx.ops" or m.startswith("specfx.ops.") for m in imported), (name, imported)
    assert not any(m.startswith("specfx.cost_model") for m in planning["gpu_costs"] | planning["rates"])
    assert torch.ops.specfx.lowered_conv.default is specfx.ops.lowered_conv.overload
