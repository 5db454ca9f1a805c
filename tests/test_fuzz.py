"""Arbitrary bodies and headers: the endpoint answers 4xx, never runs a
handler, and never fails with a 500.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_ploints._signature import sign
from flask_ploints.testing import build_event

from .support import SECRET
from .support import build_app

header_values = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
    max_size=80,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
# Bodies that are signed correctly but wrong in shape: the parser must
# reject every one of them with a 400.
bad_events = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "id": json_values,
            "type": json_values,
            "timestamp": json_values,
            "data": json_values,
        },
    ).map(lambda value: json.dumps(value).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    body=st.binary(max_size=400),
    content_type=st.one_of(
        st.none(), st.sampled_from(["application/json", "text/plain"]), header_values
    ),
    signature=st.one_of(st.none(), header_values),
)
def test_unsigned_noise_gets_4xx_and_runs_nothing(
    method: str, body: bytes, content_type: str | None, signature: str | None
) -> None:
    app, webhooks = build_app()
    ran: list[str] = []
    webhooks.on_any(lambda event: ran.append(event.id))
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if signature is not None:
        headers["X-Ploints-Signature"] = signature
    response = app.test_client().open(
        "/webhooks/ploints", method=method, data=body, headers=headers
    )
    assert 400 <= response.status_code < 500
    assert ran == []


@settings(max_examples=300, deadline=None)
@given(body=bad_events)
def test_signed_garbage_gets_400_and_runs_nothing(body: bytes) -> None:
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    valid = isinstance(value, dict) and isinstance(value.get("data"), dict)
    app, webhooks = build_app()
    ran: list[str] = []
    webhooks.on_any(lambda event: ran.append(event.id))
    response = app.test_client().post(
        "/webhooks/ploints",
        data=body,
        headers={"Content-Type": "application/json", "X-Ploints-Signature": sign(body, SECRET)},
    )
    if valid and response.status_code == 200:
        # A generated body can happen to be a real event; then it must run.
        assert len(ran) == 1
        return
    assert response.status_code == 400
    assert ran == []


@settings(max_examples=100, deadline=None)
@given(
    data=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    event_id=st.text(
        # Every storable id: no control characters, lone surrogates or line
        # separators (those are a 400, see test_events.py).
        alphabet=st.characters(
            blacklist_categories=("Cc", "Cs"), blacklist_characters="\u2028\u2029"
        ),
        min_size=1,
        max_size=255,
    ),
)
def test_any_well_formed_event_is_processed_once(data: dict[str, object], event_id: str) -> None:
    app, webhooks = build_app()
    ran: list[str] = []
    webhooks.on_any(lambda event: ran.append(event.id))
    body = json.dumps(build_event("points.earned", data, id=event_id)).encode()
    headers = {"Content-Type": "application/json", "X-Ploints-Signature": sign(body, SECRET)}
    client = app.test_client()
    assert client.post("/webhooks/ploints", data=body, headers=headers).status_code == 200
    assert client.post("/webhooks/ploints", data=body, headers=headers).status_code == 200
    assert ran == [event_id]


@settings(max_examples=100, deadline=None)
@given(
    event_id=st.text(min_size=1, max_size=255).filter(
        lambda text: any(
            ord(char) < 0x20
            or 0x7F <= ord(char) <= 0x9F
            or 0xD800 <= ord(char) <= 0xDFFF
            or char in "\u2028\u2029"
            for char in text
        )
    ),
)
def test_an_unstorable_id_is_a_400_never_a_503(event_id: str) -> None:
    app, webhooks = build_app()
    ran: list[str] = []
    webhooks.on_any(lambda event: ran.append(event.id))
    body = json.dumps(build_event("points.earned", id=event_id)).encode()
    headers = {"Content-Type": "application/json", "X-Ploints-Signature": sign(body, SECRET)}
    response = app.test_client().post("/webhooks/ploints", data=body, headers=headers)
    assert response.status_code == 400
    assert response.get_json() == {
        "error": "field 'id' holds a control character or a lone surrogate"
    }
    assert ran == []
