"""`rs serve`: explore a finished front in the browser, with live in-place soups of its experts.

`session.py` holds the run (module, experts, fixed test examples) and soups under a lock; `app.py` is the
FastAPI application (the JSON API and the page); `page.html` is the page, drawn with plotly.js served from the
plotly Python package (works offline).
"""

from rs_lightning.serve.session import SoupResult, SoupSession

__all__ = ["SoupResult", "SoupSession"]
