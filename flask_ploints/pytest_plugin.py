"""The pytest plugin installed with the package (the ``pytest11`` entry
point ``ploints``): the ``ploints_client`` fixture. The helpers it builds
on, in :mod:`flask_ploints.testing`, work without pytest.

.. versionadded:: 0.2
"""

from __future__ import annotations

import pytest
from flask import Flask

# Before the import: the contracts' asserts then report their operands.
pytest.register_assert_rewrite("flask_ploints.testing")

from .testing import PlointsClient  # noqa: E402

__all__ = ["ploints_client"]


@pytest.fixture
def ploints_client(app: Flask) -> PlointsClient:
    """A :class:`~flask_ploints.testing.PlointsClient` for the ``app``
    fixture's default instance.
    """
    return PlointsClient(app)
