"""Tests of the `Event` value and the encoder."""

from __future__ import annotations

import attrs
import pytest

from trio_stream._core._errors import LocalProtocolError, TrioStreamError
from trio_stream._core._events import Event, encode, encode_comment, encode_retry


def test_encode_data_only() -> None:
    assert encode(Event(data="hello")) == b"data: hello\n\n"


def test_encode_empty_data_is_one_empty_data_line() -> None:
    assert encode(Event()) == b"data: \n\n"


def test_encode_all_fields_in_order() -> None:
    event = Event(data="x", event="tick", id="7", retry=1500)
    assert encode(event) == b"id: 7\nevent: tick\nretry: 1500\ndata: x\n\n"


def test_encode_empty_id_and_event_are_sent() -> None:
    assert encode(Event(data="x", event="", id="")) == b"id: \nevent: \ndata: x\n\n"


def test_encode_retry_zero_is_sent() -> None:
    assert encode(Event(data="x", retry=0)) == b"retry: 0\ndata: x\n\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\n\rb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\n", b"data: a\ndata: \n\n"),
        ("\n", b"data: \ndata: \n\n"),
        ("\r\n\r\n", b"data: \ndata: \ndata: \n\n"),
    ],
)
def test_encode_line_breaks_in_data_become_data_lines(data: str, expected: bytes) -> None:
    assert encode(Event(data=data)) == expected


def test_encode_keeps_other_characters_in_data() -> None:
    data = " lead\ttab\x00nul\x85nel\u2028ls\x0bvt é€😀"
    assert encode(Event(data=data)) == b"data: " + data.encode() + b"\n\n"


def test_encode_is_utf8() -> None:
    assert encode(Event(data="é", event="ü", id="€")) == ("id: €\nevent: ü\ndata: é\n\n".encode())


_BREAKING = ["a\rb", "a\nb", "a\r\nb", "a\x00b", "\n", "\x00"]


@pytest.mark.parametrize("bad", _BREAKING)
def test_event_line_break_or_nul_in_id_raises(bad: str) -> None:
    with pytest.raises(LocalProtocolError, match=r"^event id must"):
        Event(data="x", id=bad)


@pytest.mark.parametrize("bad", _BREAKING)
def test_event_line_break_or_nul_in_event_raises(bad: str) -> None:
    with pytest.raises(LocalProtocolError, match=r"^event event must"):
        Event(data="x", event=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True, False, float("nan")])
def test_event_bad_retry_raises(bad: object) -> None:
    with pytest.raises(LocalProtocolError, match="retry"):
        Event(data="x", retry=bad)  # type: ignore[arg-type]


def test_event_data_must_be_str() -> None:
    with pytest.raises(TypeError):
        Event(data=b"bytes")  # type: ignore[arg-type]


def test_event_defaults() -> None:
    assert Event() == Event(data="", event=None, id=None, retry=None)


def test_event_is_frozen_and_keyword_only() -> None:
    event = Event(data="x")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        event.data = "y"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Event("x")  # type: ignore[call-arg]


def test_event_equality_and_hash() -> None:
    assert Event(data="x", id="1") == Event(data="x", id="1")
    assert hash(Event(data="x", id="1")) == hash(Event(data="x", id="1"))
    assert Event(data="x", id="1") != Event(data="x", id="2")


def test_local_protocol_error_is_a_value_error() -> None:
    assert issubclass(LocalProtocolError, ValueError)
    assert issubclass(LocalProtocolError, TrioStreamError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", b":\n\n"),
        ("ping", b": ping\n\n"),
        ("a\nb", b": a\n: b\n\n"),
        ("a\r\nb\rc", b": a\n: b\n: c\n\n"),
        ("a\n\nb", b": a\n:\n: b\n\n"),
        ("é", ": é\n\n".encode()),
    ],
)
def test_encode_comment(text: str, expected: bytes) -> None:
    assert encode_comment(text) == expected


def test_encode_comment_default_is_empty_comment() -> None:
    assert encode_comment() == b":\n\n"


@pytest.mark.parametrize(
    ("milliseconds", "expected"), [(0, b"retry: 0\n\n"), (3000, b"retry: 3000\n\n")]
)
def test_encode_retry(milliseconds: int, expected: bytes) -> None:
    assert encode_retry(milliseconds) == expected


@pytest.mark.parametrize(
    "bad",
    [
        -1,
        2.5,
        "3000",
        True,
        None,
    ],
)
def test_encode_retry_bad_value_raises(bad: object) -> None:
    with pytest.raises(LocalProtocolError, match="retry"):
        encode_retry(bad)  # type: ignore[arg-type]
