"""Keep the webhook endpoint out of app-wide protections meant for browsers.

A delivery is a signed server-to-server POST: it carries no CSRF token and
arrives in bursts from a few addresses. Two extensions that guard a whole
app would refuse it:

* Flask-WTF's ``CSRFProtect`` (``app.extensions["csrf"]``) answers ``400``
  without a token;
* Flask-Limiter's ``Limiter`` (``app.extensions["limiter"]``) counts
  deliveries against its default and application limits and answers
  ``429``.

:func:`exempt_from_protections` exempts the endpoint's blueprint through
their public ``exempt()`` methods. It runs when the endpoint is set up (for
extensions set up before it) and again on the first delivery (for those set
up after it), before any ``before_request`` function; see
:func:`exempt_on_first_delivery`.

Neither package is imported here: an instance of their class exists only if
their module was imported by the app, so the check looks in
:data:`sys.modules` and an unused optional package stays unimported.

.. versionadded:: 0.2
"""

from __future__ import annotations

import sys
import typing as t

from flask import Blueprint
from flask import Flask
from flask import current_app

__all__ = ["exempt_from_csrf", "exempt_from_protections", "exempt_on_first_delivery"]


def exempt_from_protections(app: Flask, blueprint: Blueprint) -> None:
    """Exempt ``blueprint`` from the CSRF check of Flask-WTF and from the
    default and application limits of every Flask-Limiter instance
    registered on ``app`` so far. Calling it again is harmless.

    Limits applied to the blueprint on purpose (``limiter.limit(...)(bp)``,
    ``limiter.shared_limit(...)(bp)``) still apply.
    """
    exempt_from_csrf(app, blueprint)
    for limiter in app.extensions.get("limiter", ()):
        if _instance_of(limiter, "flask_limiter", "Limiter"):
            # Imported already, by whoever made the limiter.
            from flask_limiter import ExemptionScope

            # Not META: Flask-Limiter then ignores the blueprint's own limits
            # too, and those are how a user limits deliveries on purpose.
            limiter.exempt(blueprint, flags=ExemptionScope.DEFAULT | ExemptionScope.APPLICATION)


def exempt_from_csrf(app: Flask, blueprint: Blueprint) -> None:
    """Exempt ``blueprint`` from the CSRF check of Flask-WTF, if ``app``
    has one. Calling it again is harmless.
    """
    csrf = app.extensions.get("csrf")
    if csrf is not None and _instance_of(csrf, "flask_wtf.csrf", "CSRFProtect"):
        csrf.exempt(blueprint)


def exempt_on_first_delivery(blueprint: Blueprint) -> None:
    """Run :func:`exempt_from_protections` again on ``blueprint``'s first
    request, for the extensions set up after it. Call before the blueprint
    is registered.
    """

    # A URL value preprocessor of the blueprint runs for its requests only,
    # and before every before_request function, the app's included: the
    # CSRF check and the rate limit are both before_request functions.
    # Once is enough: an extension can no longer be set up on an app that
    # has handled a request (Flask refuses new before_request functions).
    @blueprint.url_value_preprocessor
    def exempt_late(endpoint: str | None, values: dict[str, t.Any] | None) -> None:
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        exempt_from_protections(app, blueprint)
        # Done: off the request path, by replacing the list of the app's
        # registry rather than changing it under a request reading it.
        funcs = app.url_value_preprocessors.get(blueprint.name, [])
        app.url_value_preprocessors[blueprint.name] = [f for f in funcs if f is not exempt_late]


def _instance_of(obj: object, module: str, name: str) -> bool:
    # Looked up, not imported: see the module's docstring.
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(obj, cls)
