from __future__ import annotations

__all__ = ["LocalProtocolError", "RemoteProtocolError", "TrioStreamError"]


class TrioStreamError(Exception):
    """Base class of every exception trio_stream raises on its own account."""


class LocalProtocolError(TrioStreamError, ValueError):
    """The caller asked for something the protocol cannot express.

    For example an event id containing a line break, which would split the event on the
    wire. The mistake is in the calling code, not in the peer.
    """


class RemoteProtocolError(TrioStreamError):
    """The peer sent something the protocol does not allow, or answered unexpectedly."""
