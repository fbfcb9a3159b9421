"""Side-by-side benchmarks of trio_stream and sse-starlette on uvicorn (issue 5).

Run ``python -m benchmarks --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations
