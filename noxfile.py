"""The test suite where users run it: on each supported Python with the
newest dependencies, and on the oldest Python with every dependency at the
lowest version ``setup.cfg`` claims.

Run ``nox -s tests-3.13`` or ``nox -s lowest``; each session makes its own
virtualenv under ``.nox/`` and leaves ``.venv`` alone. Set
``PLOINTS_REQUIRE_SERVICES=1`` (as ``.ci/run`` does) to make the service
tests fail instead of skipping when a service is missing.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import nox
from packaging.version import Version

ROOT = Path(__file__).parent
#: Every extra the suite needs (``docs`` builds the docs only).
EXTRAS = "suite,dev,async,redis,sqlalchemy,celery,prometheus,otel"
#: Extras of tools that check this project's own source (``scripts/test``
#: runs them at their newest); users never install them with the package.
TOOLS = {"dev", "docs"}
#: A lower bound in ``setup.cfg``: a name, optional extras, ``>=`` a version.
_BOUND = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*>=\s*([^\s,;]+)\s*$")

nox.options.sessions = ["tests-3.11", "tests-3.13", "lowest"]
nox.options.reuse_existing_virtualenvs = False


def lowest_constraints() -> list[str]:
    """Pin each ``name>=X`` of ``install_requires`` and of every extra but
    :data:`TOOLS` to ``name==X``, the highest ``X`` where extras differ. A
    requirement without a lower bound, and everything the pinned ones pull
    in, is left to pip.
    """
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    for extra, value in config["options.extras_require"].items():
        if extra not in TOOLS:
            lines += value.splitlines()
    pins: dict[str, str] = {}
    for line in lines:
        match = _BOUND.match(line)
        if match is None:
            continue
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        version = match[3]
        # The extras are installed together: the highest bound holds.
        if name not in pins or Version(version) > Version(pins[name]):
            pins[name] = version
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _suite(
    session: nox.Session,
    *install: str,
    deselect: str | None = None,
    options: list[str] | None = None,
) -> None:
    session.install(*install, f".[{EXTRAS}]")
    session.run("python", "-m", "pip", "freeze", "--exclude-editable", silent=False)
    ignore = [] if deselect is None else [f"--ignore={deselect}"]
    workers = ["--numprocesses", "2", "--dist", "loadfile"]  # as scripts/test
    session.run("python", "-m", "pytest", *workers, *ignore, *(options or []), *session.posargs)


#: Python 3.13 warns of a ``sqlite3.Connection`` that is garbage-collected
#: unclosed; some of the suite's SQLite connections are, and with
#: ``filterwarnings = error`` the warning fails whichever test the collection
#: happens in. Until they are closed, this one warning is let through there.
SQLITE_UNCLOSED = "ignore:unclosed database in <sqlite3.Connection:ResourceWarning"


@nox.session(python=["3.11", "3.13"])
def tests(session: nox.Session) -> None:
    """The whole suite with the newest dependencies."""
    warnings = ["-W", SQLITE_UNCLOSED] if session.python == "3.13" else []
    _suite(session, options=warnings)


@nox.session(python="3.11")
def lowest(session: nox.Session) -> None:
    """The whole suite with every dependency at its lowest claimed version."""
    # Beside the virtualenv, not in session.create_tmp(): that would point
    # TMPDIR into this checkout, where the pytester runs of the suite find
    # its pytest settings.
    path = Path(session.virtualenv.location) / "lowest-constraints.txt"
    path.write_text("\n".join(lowest_constraints()) + "\n")
    session.log("constraints:\n" + path.read_text())
    # mypy --strict on this checkout reads the type hints of the installed
    # redis-py and SQLAlchemy, complete only in their newer releases; a
    # user's mypy does not check an installed package's own source.
    _suite(session, "--constraint", str(path), deselect="tests/test_typing.py")
