import pytest
from flask import Flask
from quickstart import app as quickstart_app


@pytest.fixture
def app() -> Flask:
    quickstart_app.testing = True
    return quickstart_app
