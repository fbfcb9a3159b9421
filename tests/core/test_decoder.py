"""Tests of the incremental decoder against the WHATWG "event stream interpretation"."""

from __future__ import annotations

import itertools
import re
from typing import Final

import pytest
from hypothesis import given, strategies as st

from trio_stream._core._decoder import DEFAULT_MAX_LINE_LENGTH, Decoder
from trio_stream._core._errors import LocalProtocolError, RemoteProtocolError
from trio_stream._core._events import Event, encode, encode_comment, encode_retry


def decode(*chunks: bytes, decoder: Decoder | None = None) -> list[Event]:
    """Feed *chunks* one by one, then close; return every event dispatched."""
    decoder = Decoder() if decoder is None else decoder
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events


def decode_state(*chunks: bytes) -> tuple[list[Event], str, int | None]:
    decoder = Decoder()
    events = decode(*chunks, decoder=decoder)
    return events, decoder.last_event_id, decoder.retry


def ev(data: str, event: str | None = None, id: str | None = None) -> Event:
    return Event(data=data, event=event, id=id)


# --- Dispatch and the data buffer -------------------------------------------------------


def test_decoder_dispatches_on_blank_line() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: hello\n") == []
    assert decoder.feed(b"\n") == [ev("hello")]


def test_decoder_returns_every_event_of_a_chunk_in_order() -> None:
    assert Decoder().feed(b"data: a\n\ndata: b\n\ndata: c\n\n") == [ev("a"), ev("b"), ev("c")]


def test_decoder_joins_data_lines_with_lf() -> None:
    assert decode(b"data: a\ndata: b\ndata: c\n\n") == [ev("a\nb\nc")]


def test_decoder_empty_data_lines() -> None:
    assert decode(b"data\n\n") == [ev("")]
    assert decode(b"data:\n\n") == [ev("")]
    assert decode(b"data\ndata\n\n") == [ev("\n")]
    assert decode(b"data: a\ndata:\n\n") == [ev("a\n")]
    assert decode(b"data:\ndata: a\n\n") == [ev("\na")]


def test_decoder_no_data_no_dispatch() -> None:
    events, last_event_id, _ = decode_state(b"event: e\nid: 1\n\n")
    assert events == []
    assert last_event_id == "1"


def test_decoder_blank_lines_alone_dispatch_nothing() -> None:
    assert decode(b"\n\n\n\r\n\r\r") == []


def test_decoder_unterminated_event_is_not_dispatched_at_close() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [ev("a")]
    assert decoder.close() == []


def test_decoder_unterminated_line_is_discarded_at_close() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\n\nretry: 100\nid: 2\ndata: b\n\nretry: 500") == [
        ev("a"),
        ev("b", id="2"),
    ]
    assert decoder.close() == []
    assert decoder.retry == 100


def test_decoder_close_is_idempotent_and_feed_after_close_raises() -> None:
    decoder = Decoder()
    assert decoder.close() == []
    assert decoder.close() == []
    with pytest.raises(LocalProtocolError, match="closed"):
        decoder.feed(b"data: x\n\n")


def test_decoder_feed_empty_chunk() -> None:
    decoder = Decoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: x\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [ev("x")]


# --- Lines ------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_decoder_line_endings(eol: bytes) -> None:
    stream = b"event: e" + eol + b"data: a" + eol + b"data: b" + eol + eol
    assert decode(stream) == [ev("a\nb", event="e")]


def test_decoder_mixed_line_endings() -> None:
    assert decode(b"data: a\rdata: b\r\ndata: c\n\r\n") == [ev("a\nb\nc")]
    assert decode(b"data: a\n\rdata: b\r\n\ndata: c\r\r") == [ev("a"), ev("b"), ev("c")]


def test_decoder_cr_cr_is_a_blank_line_but_crlf_is_not() -> None:
    assert decode(b"data: a\r\r") == [ev("a")]
    assert decode(b"data: a\r\n") == []


def test_decoder_cr_at_chunk_end_then_lf_is_one_line_ending() -> None:
    """A CRLF split across chunks must not count as a CR line and an empty LF line."""
    decoder = Decoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: b\r") == []
    assert decoder.feed(b"\ndata: c\r\n\r") == [ev("a\nb\nc")]
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: d\r") == []
    assert decoder.feed(b"\r") == [ev("d")]


def test_decoder_cr_at_chunk_end_survives_empty_chunks() -> None:
    """A chunk that decodes to no text (empty, or half a character) is not a line."""
    decoder = Decoder()
    assert decoder.feed(b"data: \xc3\xa9\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: \xe2\x82\xac\r") == []
    assert decoder.feed(b"\xf0\x9f") == []
    assert decoder.feed(b"\x98\x80\n") == []  # a line of its own: an unknown field
    assert decoder.feed(b"\n") == [ev("\u00e9\n\u20ac")]


def test_decoder_crlf_at_chunk_end_then_lf_is_a_blank_line() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\r\n") == []
    assert decoder.feed(b"\n") == [ev("a")]


def test_decoder_other_unicode_line_breaks_are_not_line_endings() -> None:
    data = "a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g"
    assert decode(b"data: " + data.encode() + b"\n\n") == [ev(data)]


# --- BOM and UTF-8 ----------------------------------------------------------------------


def test_decoder_strips_leading_bom() -> None:
    assert decode(b"\xef\xbb\xbfdata: a\n\n") == [ev("a")]


def test_decoder_strips_only_one_bom() -> None:
    # The second BOM is part of the field name, which is then unknown.
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n") == [ev("b")]


def test_decoder_bom_split_across_chunks() -> None:
    assert decode(b"\xef", b"\xbb", b"\xbf", b"data: a\n\n") == [ev("a")]
    assert decode(b"", b"\xef\xbb", b"\xbfdata: a\n\n") == [ev("a")]


def test_decoder_bom_only_at_stream_start() -> None:
    assert decode(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [ev("a")]
    assert decode(b"data: \xef\xbb\xbfb\n\n") == [ev("\ufeffb")]
    assert decode(b"data: a\n\n", b"\xef\xbb\xbfdata: b\n\n") == [ev("a")]


def test_decoder_multibyte_characters_split_across_chunks() -> None:
    stream = "data: é€😀\n\n".encode()
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == [ev("é€😀")]


def test_decoder_replaces_invalid_utf8() -> None:
    assert decode(b"data: a\xffb\n\n") == [ev("a\ufffdb")]
    # A truncated sequence followed by an ASCII byte.
    assert decode(b"data: \xe2\x82a\n\n") == [ev("\ufffda")]
    # An encoded surrogate is three errors (WHATWG and Python agree).
    assert decode(b"data: \xed\xa0\x80\n\n") == [ev("\ufffd\ufffd\ufffd")]


def test_decoder_truncated_utf8_at_end_of_line() -> None:
    assert decode(b"data: \xe2\x82", b"\n\n") == [ev("\ufffd")]


def test_decoder_bom_that_is_not_one_is_replaced() -> None:
    assert decode(b"\xef\xbb", b"data: a\n\n") == []  # U+FFFD + "data" is an unknown field
    assert decode(b"\xef\xbb\n", b"data: a\n\n") == [ev("a")]


# --- Comments and fields ----------------------------------------------------------------


def test_decoder_comments_are_ignored() -> None:
    stream = b": hello\ndata: a\n:\n: data: no\ndata: b\n\n:only a comment\n\n"
    assert decode(stream) == [ev("a\nb")]


def test_decoder_comment_does_not_end_an_event() -> None:
    assert decode(encode_comment("ping"), b"data: a\n", encode_comment(), b"\n") == [ev("a")]


def test_decoder_splits_field_at_first_colon() -> None:
    assert decode(b"data: a: b\n\n") == [ev("a: b")]
    assert decode(b"data:a:b\n\n") == [ev("a:b")]
    assert decode(b"data::\n\n") == [ev(":")]


def test_decoder_strips_only_one_leading_space() -> None:
    assert decode(b"data:test\n\ndata: test\n\n") == [ev("test"), ev("test")]
    assert decode(b"data:  two\n\n") == [ev(" two")]
    assert decode(b"data:\ttab\n\n") == [ev("\ttab")]
    assert decode(b"data: trailing  \n\n") == [ev("trailing  ")]


def test_decoder_field_without_colon_has_empty_value() -> None:
    assert decode(b"data\n\n") == [ev("")]
    assert decode(b"event: e\nevent\ndata: x\n\n") == [ev("x")]


def test_decoder_field_names_are_exact() -> None:
    assert decode(b"Data: x\n\n") == []
    assert decode(b"data : x\n\n") == []
    assert decode(b" data: x\n\n") == []
    assert decode(b"data: x\nEvent: e\nID: 1\n\n") == [ev("x")]


def test_decoder_ignores_unknown_fields() -> None:
    assert decode(b"foo: bar\ndata: x\nbaz\n\n") == [ev("x")]


# --- event ------------------------------------------------------------------------------


def test_decoder_event_type() -> None:
    assert decode(b"event: add\ndata: x\n\n") == [ev("x", event="add")]


def test_decoder_event_type_last_one_wins() -> None:
    assert decode(b"event: a\nevent: b\ndata: x\n\n") == [ev("x", event="b")]


def test_decoder_event_type_is_reset_after_dispatch() -> None:
    assert decode(b"event: a\ndata: x\n\ndata: y\n\n") == [ev("x", event="a"), ev("y")]


def test_decoder_event_type_is_reset_by_blank_line_without_data() -> None:
    assert decode(b"event: a\n\ndata: x\n\n") == [ev("x")]


def test_decoder_empty_event_type_is_none() -> None:
    assert decode(b"event:\ndata: x\n\n") == [ev("x")]


def test_decoder_event_type_with_nul_has_it_replaced() -> None:
    """`Event` refuses NUL in an event type, which the standard allows: it is replaced."""
    assert decode(b"event: a\x00b\ndata: x\n\n") == [ev("x", event="a\ufffdb")]


# --- id ---------------------------------------------------------------------------------


def test_decoder_id_is_carried_across_events() -> None:
    events, last_event_id, _ = decode_state(b"id: 1\ndata: a\n\ndata: b\n\n")
    assert events == [ev("a", id="1"), ev("b", id="1")]
    assert last_event_id == "1"


def test_decoder_empty_id_resets_it() -> None:
    events, last_event_id, _ = decode_state(b"id: 1\ndata: a\n\nid\ndata: b\n\n")
    assert events == [ev("a", id="1"), ev("b")]
    assert last_event_id == ""
    assert decode(b"id: 1\ndata: a\n\nid:\ndata: b\n\n") == [ev("a", id="1"), ev("b")]


def test_decoder_id_with_nul_is_ignored() -> None:
    events, last_event_id, _ = decode_state(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert events == [ev("a", id="1"), ev("b", id="1")]
    assert last_event_id == "1"


def test_decoder_id_applies_to_its_whole_event() -> None:
    assert decode(b"data: a\nid: 5\ndata: b\n\n") == [ev("a\nb", id="5")]


def test_decoder_last_event_id_changes_only_at_dispatch() -> None:
    decoder = Decoder()
    assert decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n") == [ev("a", id="1")]
    assert decoder.last_event_id == "1"
    assert decoder.close() == []
    assert decoder.last_event_id == "1"


def test_decoder_last_event_id_set_by_dispatch_without_data() -> None:
    decoder = Decoder()
    decoder.feed(b"id: 9\n\n")
    assert decoder.last_event_id == "9"


def test_decoder_initial_last_event_id() -> None:
    """The id a stream resumed from stays until the first dispatch, which (the stream's
    own buffer starting empty) resets it if the stream sent no id."""
    decoder = Decoder(last_event_id="7")
    assert decoder.last_event_id == "7"
    assert decoder.feed(b"data: a\n") == []
    assert decoder.last_event_id == "7"
    assert decoder.feed(b"\nid: 8\ndata: b\n\n") == [ev("a"), ev("b", id="8")]
    assert decoder.last_event_id == "8"


# --- retry ------------------------------------------------------------------------------


def test_decoder_retry_sets_reconnection_time_without_dispatch() -> None:
    decoder = Decoder()
    assert decoder.retry is None
    assert decoder.feed(b"retry: 1500\n") == []
    assert decoder.retry == 1500
    assert decoder.feed(b"retry: 0\n\n") == []
    assert decoder.retry == 0


def test_decoder_decoded_events_have_no_retry() -> None:
    assert decode(b"retry: 10\ndata: x\n\n") == [ev("x")]


def test_decoder_retry_leading_zeros() -> None:
    decoder = Decoder()
    decoder.feed(b"retry: 007\n")
    assert decoder.retry == 7
    decoder.feed(b"retry: 000\n")
    assert decoder.retry == 0


@pytest.mark.parametrize(
    "value",
    [
        "",
        " 100",
        "100 ",
        "+100",
        "-100",
        "1.5",
        "1e3",
        "10a",
        "0x10",
        "\u0661\u0662",  # Arabic-Indic digits: digits, but not ASCII
        "\uff11",  # fullwidth one
        "\u00b2",  # superscript two
        "9" * 19 + "0",
        "1" + "0" * 5000,
    ],
)
def test_decoder_retry_ignores_values_not_ascii_digits(value: str) -> None:
    decoder = Decoder()
    decoder.feed(b"retry: 42\n")
    decoder.feed(b"retry: " + value.encode() + b"\n")
    assert decoder.retry == 42


def test_decoder_retry_largest_accepted_value() -> None:
    decoder = Decoder()
    decoder.feed(b"retry: 000" + b"9" * 19 + b"\n")
    assert decoder.retry == 10**19 - 1


def test_decoder_retry_frame_from_encoder() -> None:
    decoder = Decoder()
    assert decoder.feed(encode_retry(3000)) == []
    assert decoder.retry == 3000


# --- The standard's examples ------------------------------------------------------------


def test_decoder_spec_example_stock() -> None:
    assert decode(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [ev("YHOO\n+2\n10")]


def test_decoder_spec_example_ids() -> None:
    stream = (
        b": test stream\n"
        b"\n"
        b"data: first event\n"
        b"id: 1\n"
        b"\n"
        b"data:second event\n"
        b"id\n"
        b"\n"
        b"data:  third event\n"
        b"\n"
    )
    decoder = Decoder()
    events = decoder.feed(stream)
    assert events == [ev("first event", id="1"), ev("second event"), ev(" third event")]
    assert decoder.last_event_id == ""


def test_decoder_spec_example_empty_data() -> None:
    assert decode(b"data\n\ndata\ndata\n\ndata:") == [ev(""), ev("\n")]


def test_decoder_spec_example_space_after_colon() -> None:
    assert decode(b"data:test\n\ndata: test\n\n") == [ev("test"), ev("test")]


# --- Limits -----------------------------------------------------------------------------


def test_decoder_default_max_line_length() -> None:
    decoder = Decoder()
    assert decoder.max_line_length == DEFAULT_MAX_LINE_LENGTH
    line = b"data: " + b"x" * (DEFAULT_MAX_LINE_LENGTH - 6)
    assert decoder.feed(line + b"\n\n") == [ev("x" * (DEFAULT_MAX_LINE_LENGTH - 6))]
    with pytest.raises(RemoteProtocolError, match="max_line_length"):
        decoder.feed(line + b"x\n\n")


def test_decoder_max_line_length_in_one_chunk() -> None:
    decoder = Decoder(max_line_length=10)
    assert decoder.feed(b"data: 1234\n\n") == [ev("1234")]
    with pytest.raises(RemoteProtocolError, match="line longer than max_line_length=10"):
        decoder.feed(b"data: a\n\ndata: 12345\n\n")


def test_decoder_max_line_length_of_unterminated_line() -> None:
    """A line that never ends is refused as soon as it is too long, in whatever chunks."""
    decoder = Decoder(max_line_length=10)
    assert decoder.feed(b"data:") == []
    assert decoder.feed(b" 1234") == []
    with pytest.raises(RemoteProtocolError, match="max_line_length"):
        decoder.feed(b"5")


def test_decoder_max_line_length_of_line_completed_by_chunk() -> None:
    decoder = Decoder(max_line_length=10)
    assert decoder.feed(b"data: 123") == []
    with pytest.raises(RemoteProtocolError, match="max_line_length"):
        decoder.feed(b"45\n\n")


def test_decoder_max_line_length_of_later_line_in_long_chunk() -> None:
    decoder = Decoder(max_line_length=10)
    with pytest.raises(RemoteProtocolError, match="max_line_length"):
        decoder.feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 12345")


def test_decoder_max_line_length_counts_characters_without_line_ending() -> None:
    decoder = Decoder(max_line_length=7)
    assert decoder.feed("data: €\r\n\r\n".encode()) == [ev("€")]


def test_decoder_max_data_length() -> None:
    decoder = Decoder(max_data_length=6)
    assert decoder.feed(b"data: ab\ndata: c\n\n") == [ev("ab\nc")]
    with pytest.raises(RemoteProtocolError, match="max_data_length=6"):
        decoder.feed(b"data: ab\ndata: cde\n")


def test_decoder_failure_keeps_state_from_before_the_chunk() -> None:
    """The events completed by the failing chunk are lost, so the id and retry they set
    must not be reported either: a client resuming from them would skip them."""
    decoder = Decoder(max_data_length=5)
    assert decoder.feed(b"retry: 10\nid: 1\ndata: a\n\n") == [ev("a", id="1")]
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"retry: 20\nid: 2\ndata: b\n\ndata: 123456\n")
    assert decoder.last_event_id == "1"
    assert decoder.retry == 10


def test_decoder_feed_after_failure_raises() -> None:
    decoder = Decoder(max_line_length=3)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"data: x\n\n")
    with pytest.raises(LocalProtocolError, match="RemoteProtocolError"):
        decoder.feed(b"\n")
    assert decoder.close() == []


@pytest.mark.parametrize("field", ["max_line_length", "max_data_length"])
@pytest.mark.parametrize("bad", [0, -1])
def test_decoder_limits_must_be_positive(field: str, bad: int) -> None:
    with pytest.raises(ValueError, match=field):
        Decoder(**{field: bad})  # type: ignore[arg-type]


# --- Round trips ------------------------------------------------------------------------

_NO_BREAKS: Final = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"))
_EVENTS: Final = st.builds(
    Event,
    data=st.text(st.characters(codec="utf-8")),
    event=st.none() | _NO_BREAKS,
    id=st.none() | _NO_BREAKS,
    retry=st.none() | st.integers(min_value=0, max_value=2**53),
)


def expected_decoding(events: list[Event]) -> tuple[list[Event], str, int | None]:
    """What decoding the encoded *events* gives: line breaks in data become LF, the id
    in force is carried over events without one, empty names and ids become None."""
    decoded: list[Event] = []
    last_event_id = ""
    retry: int | None = None
    for event in events:
        if event.id is not None:
            last_event_id = event.id
        if event.retry is not None:
            retry = event.retry
        data = event.data.replace("\r\n", "\n").replace("\r", "\n")
        decoded.append(Event(data=data, event=event.event or None, id=last_event_id or None))
    return decoded, last_event_id, retry


@given(_EVENTS)
def test_decoder_round_trip_one_event(event: Event) -> None:
    decoded, _, retry = expected_decoding([event])
    decoder = Decoder()
    assert decoder.feed(encode(event)) == decoded
    assert decoder.retry == retry


@given(st.lists(_EVENTS, max_size=10))
def test_decoder_round_trip_event_sequence(events: list[Event]) -> None:
    stream = b"".join(encode(event) for event in events)
    assert decode_state(stream) == expected_decoding(events)


def test_decoder_round_trip_every_line_break_in_data() -> None:
    event = Event(data="\r\n\r\r\n\n\n\ra\rb\nc\r\nd\r", id="x")
    assert decode(encode(event)) == [ev("\n\n\n\n\n\na\nb\nc\nd\n", id="x")]


# --- Chunking does not matter -----------------------------------------------------------

_LINE: Final = re.compile(r"([^\r\n]*)(?:\r\n|\r|\n)")


def reference_decode(stream: bytes) -> tuple[list[Event], str, int | None]:
    """The standard's algorithm, transcribed literally, on the whole stream at once."""
    text = stream.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    data = event_type = id_buffer = last_event_id = ""
    retry: int | None = None
    events: list[Event] = []
    for match in _LINE.finditer(text):
        line = match.group(1)
        if line == "":
            last_event_id = id_buffer
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append(Event(data=data, event=event_type or None, id=last_event_id or None))
            data = event_type = ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            event_type = value.replace("\0", "\ufffd")  # see the NUL test above
        elif field == "data":
            data += value + "\n"
        elif field == "id":
            if "\0" not in value:
                id_buffer = value
        elif (
            field == "retry"
            and value
            and all(c in "0123456789" for c in value)
            and int(value) < 10**19
        ):
            retry = int(value)
    return events, last_event_id, retry


_FRAGMENTS: Final = st.one_of(
    st.binary(max_size=12),
    st.sampled_from(
        [
            b"\r",
            b"\n",
            b"\r\n",
            b"\n\n",
            b"\r\r",
            b"data",
            b"data:",
            b"data: x",
            b":",
            b" ",
            b"id",
            b"id: 1",
            b"id: a\x00",
            b"event: e",
            b"retry: 12",
            b"retry: 1x",
            b"retry: 99999999999999999999",
            b"\xef\xbb\xbf",
            b"\xef\xbb",
            b"\xc3",
            b"\xa9",
            b"\xe2\x82",
            b"\xac",
            b"\xf0\x9f\x98\x80",
            b"\x00",
        ]
    ),
    _EVENTS.map(encode),
    # The encoder ends lines with LF only; a peer may use CR or CRLF.
    st.builds(
        lambda event, eol: encode(event).replace(b"\n", eol),
        _EVENTS,
        st.sampled_from([b"\r", b"\r\n"]),
    ),
)
_BOM: Final = b"\xef\xbb\xbf"


@st.composite
def fragment_lists(draw: st.DrawFn) -> list[bytes]:
    fragments = draw(st.lists(_FRAGMENTS, max_size=25))
    if draw(st.booleans()):
        fragments.insert(0, _BOM)
    return fragments


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[start:end] for start, end in itertools.pairwise(bounds)]


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A stream, and the same stream cut at some fragment boundaries (where a cut is
    most likely to fall inside a CRLF, a BOM or a UTF-8 sequence) and anywhere else."""
    fragments = draw(fragment_lists())
    stream = b"".join(fragments)
    cuts = [end for end in itertools.accumulate(map(len, fragments)) if draw(st.booleans())]
    cuts += draw(st.lists(st.integers(0, len(stream)), max_size=8))
    return stream, split(stream, cuts)


@given(fragment_lists().map(b"".join))
def test_decoder_matches_reference(stream: bytes) -> None:
    assert decode_state(stream) == reference_decode(stream)


@given(chunked_streams())
def test_decoder_chunking_does_not_matter(chunked: tuple[bytes, list[bytes]]) -> None:
    stream, chunks = chunked
    whole = decode_state(stream)
    assert decode_state(*chunks) == whole
    assert decode_state(*(stream[i : i + 1] for i in range(len(stream)))) == whole


_TRICKY: Final = (
    b"\xef\xbb\xbf: c\r\nid: 1\rdata: \xc3\xa9\xe2\x82\xac\r\n\r\n"
    b"event: e\rdata\ndata: \xf0\x9f\x98\x80\r\rretry: 25\n\rid: a\x00\r\n"
    b"data: b\xff\n\nid\ndata:  x\r\n\r"
)


def test_decoder_tricky_stream_matches_reference() -> None:
    events, last_event_id, retry = decode_state(_TRICKY)
    assert (events, last_event_id, retry) == reference_decode(_TRICKY)
    assert events == [
        ev("é€", id="1"),
        ev("\n😀", event="e", id="1"),
        ev("b\ufffd", id="1"),
        ev(" x"),
    ]
    assert retry == 25


@pytest.mark.parametrize("index", range(len(_TRICKY) + 1))
def test_decoder_split_at_every_index(index: int) -> None:
    assert decode_state(_TRICKY[:index], _TRICKY[index:]) == decode_state(_TRICKY)


def test_decoder_byte_by_byte() -> None:
    chunks = [_TRICKY[i : i + 1] for i in range(len(_TRICKY))]
    assert decode_state(*chunks) == decode_state(_TRICKY)
