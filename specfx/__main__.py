"""``python -m specfx``: the ``specfx`` command (see :mod:`specfx.cli`)."""

from .cli import main

raise SystemExit(main())
