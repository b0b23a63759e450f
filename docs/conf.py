"""Sphinx configuration: the markdown pages of docs/ (MyST) and an API reference made from
the docstrings (autodoc, numpy style through napoleon). Built in CI with warnings as
errors: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``."""

project = "d3arrow"
author = "the d3arrow developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
html_static_path = []
suppress_warnings = ["myst.header"]
