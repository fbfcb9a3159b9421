"""Where topic logs live beyond one process: ``trio_stream.backends.redis``.

The memory backend (no backend at all: ``HubConfig(backend=None)``) needs nothing and
stays the default. A backend is any object with the shape of `trio_stream._hub.Backend`.
"""

from __future__ import annotations

__all__: list[str] = []
