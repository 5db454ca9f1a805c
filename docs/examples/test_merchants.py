import pytest
from flask import Flask
from merchants import app as merchants_app
from merchants import balances

from flask_ploints.testing import PlointsClient


@pytest.fixture
def app() -> Flask:
    merchants_app.testing = True
    return merchants_app


def test_each_merchant_has_its_own_balances(ploints_client: PlointsClient) -> None:
    data = {"customerEmail": "jane@example.com", "amount": 5, "newBalance": 105}
    # Posted to /webhooks/ploints/acme, signed with acme's current secret.
    assert ploints_client.send("points.earned", data, id="evt_1", account="acme").status_code == 200
    data["newBalance"] = 7
    assert (
        ploints_client.send("points.earned", data, id="evt_1", account="globex").status_code == 200
    )
    assert balances[("acme", "jane@example.com")] == 105
    assert balances[("globex", "jane@example.com")] == 7


def test_an_unknown_merchant_is_refused(ploints_client: PlointsClient) -> None:
    # As a wrong signature is: the answer does not tell which merchants exist.
    response = ploints_client.post({"id": "evt_2"}, signature="0" * 64, account="initech")
    assert (response.status_code, response.get_json()) == (401, {"error": "invalid signature"})


def test_one_merchant_under_two_spellings_runs_once(ploints_client: PlointsClient) -> None:
    data = {"customerEmail": "joe@example.com", "amount": 5, "newBalance": 5}
    first = ploints_client.send("points.earned", data, id="evt_3", account="acme")
    again = ploints_client.send("points.earned", data, id="evt_3", account="ACME")
    assert (first.get_json(), again.get_json()) == (
        {"received": True},
        {"received": True, "duplicate": True},
    )
