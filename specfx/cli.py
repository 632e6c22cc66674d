"""The ``specfx`` command: explain and diff what specfx does to a model.

    specfx explain MODEL --input 1,3,224,224 [--dtype float32] [SETTINGS]
    specfx diff MODEL --input 1,3,224,224 [--table] [--passes] [--html report.html] [SETTINGS]
    specfx passes
    specfx spectrum MODEL --input 1,3,32,32 [--method auto|exact|bounds] [--html report.html] [--plot sv.png]

SETTINGS are one flag per field of :class:`specfx.pipeline.Settings` (``--policy``,
``--profile PATH``, ``--spectral-activation``, ``--chains/--no-chains``,
``--poly-degree N``), generated from its fields, with their defaults. ``specfx passes``
lists the pipeline: each pass, what it does and the passes it requires. ``specfx spectrum``
prints each conv and linear layer's certified operator-norm interval and the network's
Lipschitz upper bound (:func:`specfx.spectrum`).

MODEL is ``module_or_path:factory``: a dotted module, or a path to a ``.py`` file, and the
name in it of a callable that takes no arguments and returns an ``nn.Module`` (a module
class itself will do). A dotted module's top-level package is looked for in the current
directory first, then on ``sys.path``; only that name comes from the current directory, so
a stray ``networkx.py`` there does not replace the library torch imports. A file's own
imports of its neighbours work, except for names an installed module already has. The
model is put in eval mode and given random inputs of the shapes asked for (seeded, so runs
agree). Any problem with what was asked for is reported on one line of stderr, never as a
traceback: exit status 2 for a malformed command line, 1 when the model cannot be loaded,
built, run or optimized (including a factory or model that calls ``sys.exit``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import math
import os
import pathlib
import sys
import types
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

import torch
import torch.nn as nn

from .api import explain, optimize
from .capture import FRONTENDS
from .diff import diff, seeded_inputs
from .pipeline import Settings, describe_passes

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
            # Naming the file shows when an installed module of the same name was imported.
            where = f" ({module.__file__})" if getattr(module, "__file__", None) else ""
            raise CommandError(f"{source}{where} has no attribute {attribute!r}") from None
    if not callable(target):
        raise CommandError(f"{source}:{attribute} is a {type(target).__name__}, not a callable returning a model")
    return target


@contextlib.contextmanager
def _user_code(failure: Optional[str] = None) -> Iterator[None]:
    """Run the user's code (their module, factory or model), reporting whatever it raises as
    a :class:`CommandError`: ``failure`` (if given), then the exception on one line.

    That includes ``SystemExit`` (a factory calling ``sys.exit``) and the ``BaseException``
    subclasses some libraries raise to abort: specfx was asked to build and run the model,
    and a model that ends the run its own way has failed to. Only ``KeyboardInterrupt``,
    the user's own ^C, passes through, for :func:`main` to report as an interruption.
    """
    try:
        yield
    except (KeyboardInterrupt, CommandError):
        raise
    except BaseException as err:
        raise CommandError(" ".join(filter(None, (failure, _one_line(err))))) from err


def _import_source(source: str) -> types.ModuleType:
    """Import a Python file by path, or a dotted module."""
    path = pathlib.Path(source)
    if source.endswith(".py") or os.sep in source or path.is_file():
        return _import_file(source, path)
    return _import_module(source)


def _import_file(source: str, path: pathlib.Path) -> types.ModuleType:
    if not path.is_file():
        raise CommandError(f"no such file: {source}")
    name = _file_module_name(path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None:
        raise CommandError(f"cannot import {source}: not a Python file (expected a path ending in .py)")
    module = importlib.util.module_from_spec(module_spec)
    # Registered in sys.modules (as imports are) because dataclasses, pickling and typing
    # resolve a class's module through it.
    sys.modules[name] = module
    # The file's imports of its neighbours should work as when it is run as a script, but
    # from the end of the path: a neighbour must not replace a library torch imports.
    _append_to_path(str(path.resolve().parent))
    try:
        with _user_code(f"importing {source} failed:"):
            module_spec.loader.exec_module(module)
    except CommandError:
        del sys.modules[name]
        raise
    return module


def _file_module_name(path: pathlib.Path) -> str:
    """The name to register a model file under: its stem, unless that is not a plain
    module name or another module has it (imported already, or importable: a file named
    ``networkx.py`` must not become the ``networkx`` that torch imports later)."""
    stem = path.stem
    if stem.isidentifier() and stem not in sys.modules:
        found = importlib.util.find_spec(stem)
        if found is None or (found.origin is not None and pathlib.Path(found.origin).resolve() == path.resolve()):
            return stem
    return f"_specfx_model_{stem}"


def _import_module(source: str) -> types.ModuleType:
    """Import the dotted module ``source``, its top-level package from the current
    directory if that holds one (as ``python -m`` would find it) and otherwise from
    ``sys.path``, with the current directory last, so that nothing else it holds shadows
    the standard library or an installed package."""
    top = source.partition(".")[0]
    cwd = os.getcwd()
    with _user_code(f"importing {source} failed:"):
        try:
            _append_to_path(cwd)  # first: the user's module may import its neighbours
            if top not in sys.modules:
                _load_from_directory(top, cwd)
            return importlib.import_module(source)
        except ModuleNotFoundError as err:
            if err.name is not None and (source == err.name or source.startswith(err.name + ".")):
                raise CommandError(f"no module named {source!r} (looked in the current directory and on "
                                   f"sys.path)") from err
            raise


def _load_from_directory(name: str, directory: str) -> None:
    """Import the module or regular package ``name`` from ``directory``, if it is there."""
    found = importlib.machinery.PathFinder.find_spec(name, [directory])
    # A directory without __init__.py is only a namespace portion, and ordinary imports
    # prefer a regular package of that name anywhere on the path (e.g. a data folder named
    # after an installed library); the import with the directory appended does just that.
    if found is None or found.loader is None or found.origin is None:
        return
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    try:
        found.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # as the import system does: no half-run module for a later import
        raise


def _append_to_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.append(directory)


def build_model(spec: str, dtype: torch.dtype) -> nn.Module:
    """Call the factory ``spec`` names and check it gave a module, in eval mode and (for a
    floating-point ``dtype``) cast to ``dtype``."""
    factory = load_factory(spec)
    with _user_code(f"{spec}() raised"):
        model = factory()
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec}() returned an object of type {type(model).__name__}, not a torch.nn.Module")
    with _user_code(f"preparing the model {spec}() returned failed:"):
        model.eval()
        return model.to(dtype) if dtype.is_floating_point else model


def make_inputs(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of ``shapes`` (:func:`specfx.diff.seeded_inputs`), refused
    on one line where they could not be allocated."""
    described = " ".join(f"--input {','.join(map(str, shape))}" for shape in shapes)
    needed = sum(math.prod(shape) for shape in shapes) * dtype.itemsize
    memory = _physical_memory()
    # Refused up front: with overcommit, an allocation past physical memory can succeed and
    # filling it gets the process killed instead of raising.
    if memory is not None and needed > memory:
        raise CommandError(f"{described} would take {needed / 2**30:.4g} GiB as {_dtype_name(dtype)}, "
                           f"more than this machine's {memory / 2**30:.4g} GiB of memory")
    try:
        return seeded_inputs([(shape, dtype) for shape in shapes])
    except (RuntimeError, MemoryError) as err:  # too large for torch's size arithmetic, or for the allocator
        raise CommandError(f"cannot allocate {described} as {_dtype_name(dtype)}: "
                           f"{_one_line(err)}") from err


def _physical_memory() -> Optional[int]:
    """This machine's memory in bytes, where the platform says (not on Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {'; '.join(lines)}" if lines else type(err).__name__


def _parsed_by(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type``: a value it rejects (a missing or malformed
    file too) is a usage error naming the value, not a traceback."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (OSError, ValueError) as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {_one_line(err)}") from err

    return convert


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`Settings`: ``--policy`` for ``policy``, a
    ``--flag/--no-flag`` pair for a bool, a value of the default's type otherwise (or what
    the field's ``parse`` makes of its text). A flag left out is not set on the namespace,
    so the field keeps its default (see :func:`settings_options`)."""
    for field in dataclasses.fields(Settings):
        meta = field.metadata
        flag = "--" + field.name.replace("_", "-")
        shown = "" if field.default is None else f" (default: {field.default})"
        if isinstance(field.default, bool):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=meta["help"] + shown)
            continue
        parse = _parsed_by(meta["parse"]) if "parse" in meta else type(field.default)
        parser.add_argument(flag, dest=field.name, type=parse, choices=meta.get("choices"),
                            metavar=meta.get("metavar"), default=argparse.SUPPRESS, help=meta["help"] + shown)


def settings_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`Settings` fields the command line set, as keyword arguments."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(Settings)
            if hasattr(args, field.name)}


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specfx", description="Inspect what specfx does to a model's convolutions.",
                     epilog="Exit status: 0 done, 1 the model failed, 2 malformed command line.")
    from specfx import __version__

    parser.add_argument("--version", action="version", version=f"specfx {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_model_arguments(sub: argparse.ArgumentParser, settings: bool = True) -> None:
        """The model, its inputs and front end; with ``settings``, the optimize options too."""
        sub.add_argument("model", metavar="MODEL",
                         help="module_or_path:factory, e.g. mymodels:build or models/net.py:Net")
        sub.add_argument("--input", dest="inputs", metavar="SHAPE", type=parse_shape, action="append",
                         required=True, help="shape of one positional input, e.g. 1,3,224,224 (repeatable)")
        sub.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                         help="dtype of the inputs, and of the model for floating dtypes (default: float32)")
        sub.add_argument("--frontend", choices=("auto", *FRONTENDS), default="auto",
                         help="how to capture the model (default: auto)")
        if settings:
            add_settings_arguments(sub)

    explain_parser = commands.add_parser("explain", help="print the report: each conv's decision and why")
    add_model_arguments(explain_parser)
    diff_parser = commands.add_parser("diff", help="optimize the model and print the graph diff")
    add_model_arguments(diff_parser)
    diff_parser.add_argument("--table", action="store_true", help="also print the node table")
    diff_parser.add_argument("--passes", action="store_true", help="also print the diff of each pass")
    diff_parser.add_argument("--html", metavar="PATH", type=pathlib.Path,
                             help="write a self-contained HTML report to PATH")
    commands.add_parser("passes", help="list the passes of the pipeline, in order, with what each requires")
    spectrum_parser = commands.add_parser(
        "spectrum", help="print each conv and linear layer's operator-norm bounds and the network's Lipschitz bound")
    add_model_arguments(spectrum_parser, settings=False)
    spectrum_parser.add_argument("--method", choices=("auto", "exact", "bounds"), default="auto",
                                 help="exact (dense SVD, small layers), bounds, or auto: exact where small "
                                      "(default: auto)")
    spectrum_parser.add_argument("--html", metavar="PATH", type=pathlib.Path,
                                 help="write the table as a self-contained HTML page to PATH")
    spectrum_parser.add_argument("--plot", metavar="PATH", type=pathlib.Path,
                                 help="draw each layer's singular values to PATH (needs matplotlib)")
    return parser


def _run_spectrum(args: argparse.Namespace) -> None:
    from .operator_norms import spectrum

    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.inputs, dtype)
    model = build_model(args.model, dtype)
    with _user_code():
        report = spectrum(model, inputs, method=args.method, frontend=args.frontend)
    print(report)
    for path, write in ((args.html, lambda p: report.to_html(p, title=f"specfx spectrum: {args.model}")),
                        (args.plot, report.plot)):
        if path is None:
            continue
        try:
            written = write(path)
        except OSError as err:
            raise CommandError(f"cannot write {path}: {err.strerror or err}") from err
        except (ImportError, ValueError) as err:
            raise CommandError(f"cannot draw {path}: {_one_line(err)}") from err
        print(f"specfx: wrote {written}", file=sys.stderr)


def _run(args: argparse.Namespace) -> None:
    if args.command == "passes":
        from specfx.passes import PIPELINE

        print("\n".join(describe_passes(PIPELINE)))
        return
    if args.command == "spectrum":
        _run_spectrum(args)
        return
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.inputs, dtype)  # first: a shape that cannot be allocated fails fast
    model = build_model(args.model, dtype)
    options = settings_options(args)
    with _user_code():  # capture, verification or the model itself; all reported alike
        if args.command == "explain":
            print(explain(model, inputs, frontend=args.frontend, **options))
            return
        fast = optimize(model, inputs, frontend=args.frontend, **options)
        graph_diff = diff(model, fast, inputs)
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
