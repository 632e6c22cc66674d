"""The ``specfx`` command: explain and diff what specfx does to a model.

    specfx explain MODEL --input 1,3,224,224 [--dtype float32] [--policy auto]
    specfx diff MODEL --input 1,3,224,224 [--table] [--passes] [--html report.html]

MODEL is ``module_or_path:factory``: a dotted module importable from the current
directory, or a path to a ``.py`` file, and the name in it of a callable that takes no
arguments and returns an ``nn.Module`` (a module class itself will do). The model is put
in eval mode and given random inputs of the shapes asked for (seeded, so runs agree).
Any problem with what was asked for is reported on one line of stderr, never as a
traceback: exit status 2 for a malformed command line, 1 when the model cannot be
loaded, built, run or optimized.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Callable, NoReturn, Optional, Sequence

import torch
import torch.nn as nn

from .api import explain, optimize
from .capture import FRONTENDS
from .diff import diff
from .pipeline import POLICIES

EXIT_FAILED = 1  # the model could not be loaded, built, run or optimized
EXIT_USAGE = 2   # the command line itself is malformed (argparse's own convention)

DTYPES = {name: getattr(torch, name) for name in
          ("float32", "float64", "float16", "bfloat16", "int64", "int32")}


class CommandError(Exception):
    """A problem to report on one line, with the exit status to leave with."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the usage text is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` → ``(1, 3, 224, 224)``; raises ``argparse.ArgumentTypeError``."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"malformed shape {text!r}: expected non-negative integers separated by commas, e.g. 1,3,224,224")
    return tuple(int(part) for part in parts)


def load_factory(spec: str) -> Callable[[], object]:
    """The callable ``spec`` (``module_or_path:factory``) names."""
    source, sep, attribute = spec.rpartition(":")
    if not sep or not source or not attribute:
        raise CommandError(f"model {spec!r} must be given as module_or_path:factory", EXIT_USAGE)
    module = _import_source(source)
    target: object = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CommandError(f"{source} has no attribute {attribute!r}") from None
    if not callable(target):
        raise CommandError(f"{source}:{attribute} is a {type(target).__name__}, not a callable returning a model")
    return target


def _import_source(source: str):
    """Import a ``.py`` file by path, or a dotted module from the current directory."""
    path = pathlib.Path(source)
    if source.endswith(".py") or os.sep in source or path.is_file():
        if not path.is_file():
            raise CommandError(f"no such file: {source}")
        # Registered in sys.modules (as imports are) because dataclasses, pickling and
        # typing resolve a class's module through it; a name already taken is left alone.
        name = path.stem if path.stem not in sys.modules else f"_specfx_model_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        # The file's own imports of its neighbours should work as when it is run as a script.
        sys.path.insert(0, str(path.resolve().parent))
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:  # whatever the user's file raises at import
            raise CommandError(f"importing {source} failed: {_one_line(err)}") from err
        return module
    # The console script, unlike `python -m`, does not put the current directory on the path.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as err:
        if err.name is not None and (source == err.name or source.startswith(err.name + ".")):
            raise CommandError(f"no module named {source!r} (looked in the current directory and on "
                               f"sys.path)") from err
        raise CommandError(f"importing {source} failed: {_one_line(err)}") from err
    except Exception as err:  # whatever the user's module raises at import
        raise CommandError(f"importing {source} failed: {_one_line(err)}") from err


def build_model(spec: str, dtype: torch.dtype) -> nn.Module:
    """Call the factory ``spec`` names and check it gave a module, in eval mode and (for a
    floating-point ``dtype``) cast to ``dtype``."""
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as err:  # whatever the user's factory raises
        raise CommandError(f"{spec}() raised {_one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec}() returned an object of type {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    return model.to(dtype) if dtype.is_floating_point else model


def make_inputs(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of ``shapes`` (zeros for integer dtypes, e.g. token ids)."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, dtype=dtype, generator=generator) if dtype.is_floating_point
                 else torch.zeros(shape, dtype=dtype) for shape in shapes)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {'; '.join(lines)}" if lines else type(err).__name__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specfx", description="Inspect what specfx does to a model's convolutions.",
                     epilog="Exit status: 0 done, 1 the model failed, 2 malformed command line.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_model_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("model", metavar="MODEL",
                         help="module_or_path:factory, e.g. mymodels:build or models/net.py:Net")
        sub.add_argument("--input", dest="inputs", metavar="SHAPE", type=parse_shape, action="append",
                         required=True, help="shape of one positional input, e.g. 1,3,224,224 (repeatable)")
        sub.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                         help="dtype of the inputs, and of the model for floating dtypes (default: float32)")
        sub.add_argument("--policy", choices=POLICIES, default="auto", help="which convs to lower (default: auto)")
        sub.add_argument("--frontend", choices=("auto", *FRONTENDS), default="auto",
                         help="how to capture the model (default: auto)")

    explain_parser = commands.add_parser("explain", help="print the report: each conv's decision and why")
    add_model_arguments(explain_parser)
    diff_parser = commands.add_parser("diff", help="optimize the model and print the graph diff")
    add_model_arguments(diff_parser)
    diff_parser.add_argument("--table", action="store_true", help="also print the node table")
    diff_parser.add_argument("--passes", action="store_true", help="also print the diff of each pass")
    diff_parser.add_argument("--html", metavar="PATH", type=pathlib.Path,
                             help="write a self-contained HTML report to PATH")
    return parser


def _run(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    model = build_model(args.model, dtype)
    inputs = make_inputs(args.inputs, dtype)
    try:
        if args.command == "explain":
            print(explain(model, inputs, policy=args.policy, frontend=args.frontend))
            return
        fast = optimize(model, inputs, policy=args.policy, frontend=args.frontend)
        graph_diff = diff(model, fast, inputs)
    except Exception as err:  # capture, verification or the model itself; all reported alike
        raise CommandError(_one_line(err)) from err
    print(graph_diff.unified() or f"no change to the graph ({graph_diff.summary()})\n", end="")
    if args.table:
        print("\n" + graph_diff.table(), end="")
    if args.passes:
        for entry in graph_diff.per_pass():
            state = "modified the graph" if entry.modified else "left the graph unchanged"
            print(f"\n== pass {entry.name}: {state}\n{entry.diff}", end="")
    if args.html is not None:
        try:
            written = graph_diff.to_html(args.html, title=f"specfx diff: {args.model}")
        except OSError as err:
            raise CommandError(f"cannot write {args.html}: {err.strerror or err}") from err
        print(f"specfx: wrote {written}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``specfx`` console script; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        torch.manual_seed(0)  # factories that initialise weights randomly give the same model each run
        _run(args)
    except CommandError as err:
        print(f"specfx: error: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        print("specfx: interrupted", file=sys.stderr)
        return 130
    return 0
