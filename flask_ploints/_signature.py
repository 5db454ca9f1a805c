"""Signing and verifying ``X-Ploints-Signature``.

Ploints signs the raw body with HMAC-SHA256 under the endpoint's secret and
sends the lowercase hex digest. Verification works on the raw bytes, before
anything is parsed, and compares in constant time against every accepted
secret, so a secret can be rotated without dropping a delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import typing as t

__all__ = ["SIGNATURE_HEADER", "sign", "verify"]

#: The request header that carries the signature.
SIGNATURE_HEADER = "X-Ploints-Signature"

_DIGEST_LENGTH = hashlib.sha256().digest_size * 2


def sign(body: bytes, secret: str) -> str:
    """Return the signature Ploints would send for ``body``.

    :param body: the exact bytes of the request body.
    :param secret: the endpoint's secret (``whsec_...``).
    :return: the lowercase hex HMAC-SHA256 digest, 64 characters.
    """
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def _as_digest(header_value: str | None) -> bytes | None:
    if header_value is None or len(header_value) != _DIGEST_LENGTH:
        return None
    # bytes.fromhex rejects non-hex and non-ASCII characters but skips ASCII
    # whitespace; 64 characters give 32 bytes only if every one is a digit.
    try:
        digest = bytes.fromhex(header_value)
    except ValueError:
        return None
    return digest if len(digest) * 2 == _DIGEST_LENGTH else None


def verify(
    body: bytes, header_value: str | None, secrets: str | bytes | t.Iterable[str | bytes]
) -> bool:
    """Tell whether ``header_value`` is a valid signature of ``body``.

    The header must be exactly one 64-character hex digest; anything else
    (missing, empty, padded, several values, non-ASCII) is simply invalid.
    Each secret is tried with :func:`hmac.compare_digest`, and every secret is
    tried even after a match, so the time taken does not reveal which one
    matched.

    :param body: the exact bytes of the request body.
    :param header_value: the ``X-Ploints-Signature`` header, or ``None``.
    :param secrets: one secret, or several while a secret is being rotated;
        as text, or already encoded as UTF-8.
    """
    expected = _as_digest(header_value)
    if expected is None:
        return False
    if isinstance(secrets, (str, bytes)):
        secrets = (secrets,)
    matched = False
    for secret in secrets:
        key = secret if isinstance(secret, bytes) else secret.encode("utf-8")
        digest = hmac.digest(key, body, "sha256")
        matched |= hmac.compare_digest(digest, expected)
    return matched
