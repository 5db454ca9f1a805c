"""Play Ploints against the running example app: deliver one signed sample
event of each type over HTTP, then a duplicate and a forged request, and
print what the app answered.

Run by ``scripts/run-example``; or by hand, with the app running::

    python -m example_app.demo http://127.0.0.1:5000/webhooks/ploints
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from flask_ploints import EVENT_TYPES
from flask_ploints.signature import sign
from flask_ploints.testing import build_event

from . import DEMO_SECRET


def deliver(url: str, body: bytes, signature: str) -> tuple[int, str]:
    """POST one delivery as Ploints does; return the status and body."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-Ploints-Signature": signature},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def main(url: str, secret: str = DEMO_SECRET) -> int:
    """Run the demo; return 0 when every answer is what Ploints expects."""
    expected: list[tuple[str, bytes, str, int]] = []
    for number, event_type in enumerate(EVENT_TYPES, start=1):
        body = json.dumps(build_event(event_type, id=f"evt_demo_{number}")).encode()
        expected.append((event_type, body, sign(body, secret), 200))
    first = expected[0][1]
    expected.append(("duplicate of evt_demo_1", first, sign(first, secret), 200))
    forged = json.dumps(
        build_event(
            "points.earned", {"customerEmail": "eve@example.com", "amount": 10**6, "newBalance": 0}
        )
    ).encode()
    expected.append(("forged points.earned", forged, sign(forged, "whsec_guessed"), 401))

    failures = 0
    for label, body, signature, status in expected:
        answer_status, answer = deliver(url, body, signature)
        mark = "ok " if answer_status == status else "BAD"
        failures += answer_status != status
        print(f"{mark} {label:<26} -> {answer_status} {answer.strip()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000/webhooks/ploints"))
