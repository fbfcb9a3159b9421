"""``python -m trio_stream serve|demo``: the same as the ``trio-stream`` command."""

from __future__ import annotations

import sys

from ._cli import main

sys.exit(main())
