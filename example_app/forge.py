"""Send what an attacker would: a points.earned event signed with a guessed
secret. The app must answer 401 and change nothing.

    python -m example_app.forge http://127.0.0.1:5000/webhooks/ploints
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from flask_ploints._samples import build_event
from flask_ploints._signature import SIGNATURE_HEADER
from flask_ploints._signature import sign


def forge(url: str) -> int:
    """Post the forged event; print the answer; return 0 if it was 401."""
    data = {"customerEmail": "eve@example.com", "amount": 1_000_000, "newBalance": 1_000_000}
    body = json.dumps(build_event("points.earned", data)).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, "whsec_guessed")},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, answer = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            status, answer = error.code, error.read().decode()
    print(f"{status} {answer.strip()}")
    return 0 if status == 401 else 1


if __name__ == "__main__":
    sys.exit(forge(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000/webhooks/ploints"))
