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
