from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from flask_ploints import PlointsWebhooks

app = Flask(__name__)
app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1)  # type: ignore[method-assign]
app.config["PLOINTS_WEBHOOK_SECRET"] = "whsec_..."
app.config["PLOINTS_DEDUPE_STORE"] = "redis://127.0.0.1:6379/0"
app.config["PLOINTS_REQUIRE_HTTPS"] = True  # 403 to plain HTTP
webhooks = PlointsWebhooks(app)
