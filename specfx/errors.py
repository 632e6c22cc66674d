"""Errors specfx raises; all derive from :class:`SpecfxError`."""

from __future__ import annotations

from typing import Optional


class SpecfxError(Exception):
    """Base class of specfx's own errors."""


class ExampleInputError(SpecfxError, ValueError):
    """The model could not run on the example inputs it was given."""


class CaptureError(SpecfxError):
    """No front end could capture the model as an fx graph; the message lists each cause."""


class VerificationError(SpecfxError):
    """The optimized module's outputs differ from the original's beyond tolerance; the
    message names the first diverging node."""


class StalePlanError(SpecfxError, RuntimeError):
    """A lowered convolution's module was edited after :func:`specfx.optimize` (another
    submodule, weight shape, stride, padding, ...): its FFT plan no longer describes the
    conv the module now defines. Optimize the edited model again."""


class PassError(SpecfxError):
    """A pass of the pipeline failed. ``pass_name`` is the pass, ``node`` the node it was
    handling where it said (:func:`specfx.pipeline.at_node`), and ``__cause__`` the
    exception it raised."""

    def __init__(self, message: str, pass_name: Optional[str] = None, node: Optional[str] = None) -> None:
        super().__init__(message)
        self.pass_name, self.node = pass_name, node
