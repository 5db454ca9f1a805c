"""Signature verification: every malformed or wrong header is a 401, checked
before the body is parsed, and nothing runs or is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from flask import Flask

from flask_ploints import PlointsWebhooks
from flask_ploints._signature import sign
from flask_ploints._signature import verify
from flask_ploints.stores import ClaimStatus
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import build_event

from .support import OLD_SECRET
from .support import SECRET
from .support import build_app

BODY = json.dumps(build_event("points.earned", id="evt_1")).encode()
GOOD = sign(BODY, SECRET)


def test_sign_is_hex_hmac_sha256_of_the_raw_body() -> None:
    assert (
        sign(b'{"a": 1}', "whsec_k")
        == hmac.new(b"whsec_k", b'{"a": 1}', hashlib.sha256).hexdigest()
    )
    assert (
        sign(b"", "whsec_k") == "86462fd09fde8cdcbcb5980d411d2ab36b03b00b3e0a4266c7dfb74af8b345b3"
    )


def test_verify_accepts_the_right_signature() -> None:
    assert verify(BODY, GOOD, SECRET) is True


def test_verify_accepts_uppercase_hex() -> None:
    assert verify(BODY, GOOD.upper(), SECRET) is True


def test_verify_rejects_a_changed_body() -> None:
    assert verify(BODY + b" ", GOOD, SECRET) is False


def test_verify_tries_every_secret() -> None:
    assert verify(BODY, sign(BODY, OLD_SECRET), [SECRET, OLD_SECRET]) is True
    assert verify(BODY, sign(BODY, "whsec_other"), [SECRET, OLD_SECRET]) is False


BAD_HEADERS = {
    "empty": "",
    "too_short": GOOD[:-1],
    "too_long": GOOD + "0",
    "non_hex": "g" * 64,
    "non_ascii": "é" * 64,
    "whitespace_padded": f" {GOOD[:-1]}",
    "prefixed": f"sha256={GOOD}",
    "wrong_secret": sign(BODY, "whsec_wrong"),
    "two_values_joined": f"{GOOD},{GOOD}",
}


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_verify_rejects(header: str) -> None:
    assert verify(BODY, header, SECRET) is False


def test_verify_rejects_none() -> None:
    assert verify(BODY, None, SECRET) is False


def _assert_rejected_and_nothing_stored(
    app: Flask, response_status: int, calls: list[tuple[str, str]]
) -> None:
    assert response_status == 401
    assert calls == []
    store = app.extensions["ploints"]["ploints"].store
    claim = store.claim("evt_1", 1)
    assert claim.status is ClaimStatus.CLAIMED
    store.release("evt_1", claim.token)


def test_401_missing_header(app: Flask, calls: list[tuple[str, str]]) -> None:
    response = app.test_client().post(
        "/webhooks/ploints", data=BODY, headers={"Content-Type": "application/json"}
    )
    assert response.get_json() == {"error": "invalid signature"}
    _assert_rejected_and_nothing_stored(app, response.status_code, calls)


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_401_bad_header(app: Flask, calls: list[tuple[str, str]], header: str) -> None:
    response = PlointsClient(app).post(BODY, signature=header)
    assert response.get_json() == {"error": "invalid signature"}
    _assert_rejected_and_nothing_stored(app, response.status_code, calls)


def test_401_header_sent_twice(app: Flask, calls: list[tuple[str, str]]) -> None:
    response = app.test_client().post(
        "/webhooks/ploints",
        data=BODY,
        headers=[
            ("Content-Type", "application/json"),
            ("X-Ploints-Signature", GOOD),
            ("X-Ploints-Signature", GOOD),
        ],
    )
    _assert_rejected_and_nothing_stored(app, response.status_code, calls)


def test_401_checked_before_parsing(app: Flask, calls: list[tuple[str, str]]) -> None:
    response = PlointsClient(app).post(b"not json at all", signature="0" * 64)
    assert response.status_code == 401
    assert calls == []


def test_rotation_accepts_current_and_previous_secret(
    calls: list[tuple[str, str]], webhooks: PlointsWebhooks
) -> None:
    app, _ = build_app({"PLOINTS_WEBHOOK_SECRET": [SECRET, OLD_SECRET]}, webhooks)
    client = PlointsClient(app)
    assert client.secret == SECRET
    first = json.dumps(build_event("points.earned", id="evt_new")).encode()
    second = json.dumps(build_event("points.earned", id="evt_old")).encode()
    third = json.dumps(build_event("points.earned", id="evt_bad")).encode()
    assert client.post(first, signature=sign(first, SECRET)).status_code == 200
    assert client.post(second, signature=sign(second, OLD_SECRET)).status_code == 200
    assert client.post(third, signature=sign(third, "whsec_gone")).status_code == 401
    assert calls == [("points.earned", "evt_new"), ("points.earned", "evt_old")]
