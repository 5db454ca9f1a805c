from flask import Flask

from flask_ploints import Event
from flask_ploints import PlointsWebhooks

app = Flask(__name__)
main = PlointsWebhooks(app, secret="whsec_main")
partner = PlointsWebhooks(app, name="partner", url="/webhooks/partner", secret="whsec_partner")
seen: list[str] = []


@main.on("points.earned")
def main_points(event: Event) -> None:
    seen.append(f"main {event.id}")


@partner.on("points.earned")
def partner_points(event: Event) -> None:
    seen.append(f"partner {event.id}")
