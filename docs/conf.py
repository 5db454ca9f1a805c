"""Sphinx configuration for flask-ploints."""

from __future__ import annotations

from importlib.metadata import version as _version

project = "flask-ploints"
copyright = "2026, the flask-ploints authors"
release = _version("flask-ploints")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "myst_parser",
    "sphinx_click",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
intersphinx_mapping = {}
nitpicky = False
html_theme = "alabaster"
html_static_path = ["_static"]
