"""Idempotency keys of publishes: what a key may be, the digest of a batch, the result.

A publisher that lost the answer to a publish (a cut connection, a timeout) retries it
with the same key; a log that remembers the key answers with the ids of the first
publish instead of publishing the events again.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Final

from ._errors import LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ._events import Event

__all__ = ["DIGEST_LENGTH", "MAX_KEY_LENGTH", "Published", "check_idempotency_key", "digest"]

MAX_KEY_LENGTH: Final = 128
DIGEST_LENGTH: Final = 32
"""Hex digits of a batch's `digest` (128 bits)."""

_KEY: Final = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY_LENGTH}}}")


def check_idempotency_key(key: str) -> str:
    """Return *key* if it is 1-128 visible ASCII characters (``0x21``-``0x7E``).

    Raises:
        LocalProtocolError: It is not.
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise LocalProtocolError(
            f"invalid idempotency key {str(key)[:140]!r}: use 1-{MAX_KEY_LENGTH} visible "
            "ASCII characters (0x21-0x7E)"
        )
    return key


def digest(events: Sequence[Event]) -> str:
    """A digest of a batch's names and data, to tell a retry from another publish.

    Two batches of the same events in the same order have the same digest, however
    their JSON was spelled on the wire.
    """
    canonical = json.dumps([[event.event, event.data] for event in events])  # ASCII only
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_LENGTH]


class Published(list[str]):
    """The ids a publish got, in order: a ``list[str]`` with one more attribute.

    Attributes:
        replayed: ``True`` when an idempotency key named an earlier publish of the same
            events: these are that publish's ids, and nothing was published now.
    """

    __slots__ = ("replayed",)

    def __init__(self, ids: Iterable[str] = (), *, replayed: bool = False) -> None:
        super().__init__(ids)
        self.replayed = replayed

    def __repr__(self) -> str:
        return f"Published({list(self)!r}, replayed={self.replayed!r})"
