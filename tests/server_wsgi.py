"""``application`` for uWSGI, which imports a module attribute rather than
calling a factory: :func:`tests.server_app.create_app` at import.
"""

from __future__ import annotations

from .server_app import create_app

application = create_app()
