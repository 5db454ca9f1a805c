"""How an instance's event ids become the keys its store keeps them under,
so that instances sharing a store never share an id.

.. versionadded:: 0.2
"""

from __future__ import annotations

import hashlib

from ._errors import ConfigError

__all__ = ["DEFAULT_NAME", "MAX_KEY_LENGTH", "MAX_NAMESPACE", "Namespace"]

#: The longest key a store is given: SQL stores keep 255 characters.
MAX_KEY_LENGTH = 255
#: The longest ``PLOINTS_DEDUPE_NAMESPACE``.
MAX_NAMESPACE = 64
#: The name of the instance whose event ids are their own keys: an app with
#: one instance finds its ids under their own names in the store (no other
#: instance's key can spell one, since an id holds no U+001F).
DEFAULT_NAME = "ploints"
# Between a namespace and an event id: the parser refuses control
# characters in ids, so no id of one instance can spell another's key.
_SEPARATOR = "\x1f"
# Between an account and an event id: another character, so that no
# account's key can spell another instance's namespace.
_ACCOUNT_SEPARATOR = "\x1e"


class Namespace:
    """The keys of one instance's event ids.

    :param name: the instance's name.
    :param namespace: ``PLOINTS_DEDUPE_NAMESPACE``; ``None`` for the
        instance's name, or none at all for the default instance.
    :raises ConfigError: the namespace is too long or holds U+001F.
    """

    def __init__(self, name: str, namespace: str | None = None) -> None:
        if namespace is None:
            namespace = "" if name == DEFAULT_NAME else name
        if _SEPARATOR in namespace or len(namespace) > MAX_NAMESPACE:
            raise ConfigError(
                f"PLOINTS_DEDUPE_NAMESPACE (default: the instance's name) must be at most"
                f" {MAX_NAMESPACE} characters without U+001F, not {namespace!r}"
            )
        self._prefix = namespace + _SEPARATOR if namespace else ""

    @property
    def prefixed(self) -> bool:
        """Whether keys differ from the event ids they stand for."""
        return bool(self._prefix)

    def key(self, event_id: str, account: str | None = None) -> str:
        """Return the key the store keeps ``event_id`` under: the id itself
        without a namespace, else the namespace, U+001F and the id; a key
        past :data:`MAX_KEY_LENGTH` ends in the id's SHA-256 instead. The
        id of an ``account`` is that account, U+001E and the id, so the
        same id from two accounts is two events.

        .. versionchanged:: 0.2
            The ``account`` parameter.
        """
        if account is not None:
            event_id = account + _ACCOUNT_SEPARATOR + event_id
        if not self._prefix and (account is None or len(event_id) <= MAX_KEY_LENGTH):
            return event_id
        key = self._prefix + event_id
        if len(key) > MAX_KEY_LENGTH:
            key = self._prefix + "#" + hashlib.sha256(event_id.encode()).hexdigest()
        return key

    def split(self, key: str) -> tuple[str | None, str] | None:
        """Return the account (``None`` for an endpoint of one) and the
        event id that a store key of this namespace stands for, or ``None``
        for another namespace's key. A hashed key comes back as it is.

        .. versionadded:: 0.2
        """
        if self._prefix:
            if not key.startswith(self._prefix):
                return None
            key = key[len(self._prefix) :]
        elif _SEPARATOR in key:
            return None
        account, separator, event_id = key.rpartition(_ACCOUNT_SEPARATOR)
        return (account, event_id) if separator else (None, key)

    def event_id(self, key: str) -> str | None:
        """Return the event id a store key of this namespace stands for, or
        ``None`` for another namespace's key. A hashed key comes back as it
        is.
        """
        if not self._prefix:
            return None if _SEPARATOR in key else key
        return key[len(self._prefix) :] if key.startswith(self._prefix) else None
