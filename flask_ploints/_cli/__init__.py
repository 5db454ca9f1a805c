"""The ``flask ploints`` command group.

Registered through the ``flask.commands`` entry point, so every app that
installs flask-ploints has it. Each command works on one
:class:`~flask_ploints.PlointsWebhooks` instance of the app (``--name``,
default ``ploints``). Every misuse ends in a one-line error and a non-zero
exit status.
"""

from __future__ import annotations

from . import delivery as _delivery
from . import register as _register
from . import store as _store
from .group import ploints

__all__ = ["ploints"]

# The command modules register their commands on the group as they load.
del _delivery, _register, _store
