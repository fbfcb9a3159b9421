"""``hypercorn --worker-class trio trio_stream.server:app``: the app, set by environment.

Every option of ``trio-stream serve`` is read from the variable named after it:
``--global-rate`` from ``TRIO_STREAM_GLOBAL_RATE``, and so on.
"""

from __future__ import annotations

from ._cli import app_from_env

__all__ = ["app"]

app = app_from_env()
