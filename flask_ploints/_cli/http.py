"""Outbound HTTP of the commands: to an endpoint (``send``, ``simulate``)
and to the Ploints API (``register``), over http(s) only and never
following a redirect.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
import urllib.parse
import urllib.request

import click

__all__ = ["OPENER", "check_url"]


def check_url(option: str, url: str, *, https_only: bool = False) -> None:
    """Refuse what is not an http(s) URL with a host: urllib would also
    open ``file://`` and ``ftp://`` URLs.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise click.ClickException(f"{option}: not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.ClickException(f"{option} must be an http:// or https:// URL, not {url!r}")
    if https_only and parts.scheme != "https" and parts.hostname not in _LOOPBACK:
        raise click.ClickException(
            f"{option} must use https:// (plain http only to localhost): the API key would"
            " cross the network in the clear"
        )
    del port


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect is answered as it is, never followed: following one would
    # post the body, or the API key, wherever the answer points.
    def redirect_request(self, *args: t.Any, **kwargs: t.Any) -> None:
        return None


#: The opener every request of the commands goes through.
OPENER = urllib.request.build_opener(_NoRedirects)
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
