"""Errors specfx raises; all derive from :class:`SpecfxError`."""


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
