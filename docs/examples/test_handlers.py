# conftest.py gives pytest-flask's `app` fixture; flask-ploints adds `ploints_client`.
from quickstart import balances

from flask_ploints.testing import PlointsClient


def test_award_sets_the_balance(ploints_client: PlointsClient) -> None:
    data = {"customerEmail": "jane@example.com", "amount": 50, "newBalance": 350}
    response = ploints_client.send("points.earned", data, id="evt_1")
    assert response.status_code == 200
    assert balances["jane@example.com"] == 350


def test_a_retry_is_not_processed_twice(ploints_client: PlointsClient) -> None:
    ploints_client.send("points.earned", id="evt_2")
    response = ploints_client.send("points.earned", id="evt_2")
    assert response.get_json() == {"received": True, "duplicate": True}


def test_a_forged_request_is_refused(ploints_client: PlointsClient) -> None:
    response = ploints_client.post({"id": "evt_3"}, signature="0" * 64)
    assert response.status_code == 401
