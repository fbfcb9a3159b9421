"""Validation of the names that cross the wire: topics, client ids, event names."""

from __future__ import annotations

import re
from typing import Final

from ._errors import LocalProtocolError

__all__ = ["check_client_id", "check_event_name", "check_topic"]

_NAME: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise LocalProtocolError(f"invalid {kind} {value!r}: use 1-128 of [A-Za-z0-9._:-]")
    return value


def check_topic(topic: str) -> str:
    """Return *topic* if it is 1-128 characters of ``[A-Za-z0-9._:-]``.

    Raises:
        LocalProtocolError: It is not.
    """
    return _check_name("topic", topic)


def check_client_id(client_id: str) -> str:
    """Return *client_id* if it is 1-128 characters of ``[A-Za-z0-9._:-]``.

    Raises:
        LocalProtocolError: It is not.
    """
    return _check_name("client id", client_id)


def check_event_name(name: str) -> str:
    """Return *name* if it is 1-128 characters with no control characters.

    Raises:
        LocalProtocolError: It is not.
    """
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or _CONTROL.search(name):
        raise LocalProtocolError(
            f"invalid event name {name!r}: use 1-128 characters, no control characters"
        )
    return name
