"""The demo page and the browser helper in headless Chromium, against real servers.

Each server is the real command line (``trio-stream demo`` / ``trio-stream serve``) in a
subprocess on 127.0.0.1; the browser is the system Chromium driven by Playwright's sync API
(never a downloaded one). The page exposes ``window.demoState`` (counters and the history of
the events it handled, with the demo producer's ``seq``), which the tests read.

Under ``CI=true`` a missing Chromium or Playwright is a failure, elsewhere a skip.
Set ``TRIO_STREAM_E2E_SCREENSHOT=/path.png`` to keep a screenshot of the live demo page.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import attrs
import httpx
import pytest

from ._processes import CliServer, cli_server

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000  # default bound on waiting for the page to reach a state

# The demo servers: a per-client rate of 20 events/s (bucket 20) under bursts of ~80/s from
# the demo producer, a lag limit of 30 (a client is paused 30 events behind and resumes 15
# behind), and a short `retry:` so native reconnections are quick.
DEMO_OPTIONS = ["--rate", "20", "--burst", "20", "--lag-limit", "30", "--retry-ms", "300"]

# The page's own view: counters, history ({id, seq, source}) and the helper's state.
STATE_JS = """() => {
  const d = window.demoState;
  if (!d) return null;
  const s = window.demoStream;
  return {
    ready: d.ready, state: d.state, received: d.received, pauses: d.pauses,
    resumes: d.resumes, resets: d.resets, reconnects: d.reconnects, polls: d.polls,
    acks: d.acks, errors: d.errors, seqGaps: d.seqGaps, seqRepeats: d.seqRepeats,
    history: d.history, stats: s ? s.stats : null,
  };
}"""


def _unavailable(reason: str) -> None:
    """Skip, or under CI fail: the browser tests are required there."""
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"{reason}; CI=true, so the browser tests must run", pytrace=False)
    pytest.skip(reason)


# -- servers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    """``trio-stream demo``: the page at /, the bursty producer on topic ``demo``."""
    log = tmp_path_factory.mktemp("demo") / "stderr.txt"
    with cli_server("demo", DEMO_OPTIONS, log) as server:
        yield server


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    """``trio-stream serve`` with generous limits."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with cli_server("serve", ["--rate", "1000", "--burst", "1000"], log) as server:
        yield server


def publish(server: CliServer, topic: str, seqs: Iterable[int]) -> list[str]:
    """Publishes one event per seq (JSON data like the demo producer's); returns the ids."""
    batch = [{"data": json.dumps({"seq": seq, "phase": "e2e"})} for seq in seqs]
    response = httpx.post(f"{server.url}/streams/{topic}", json=batch, timeout=5)
    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    assert len(ids) == len(batch)
    return [str(event_id) for event_id in ids]


def metric(server: CliServer, name: str) -> float:
    """The sum of a family's samples named exactly *name* in ``/metrics``."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


@pytest.fixture
def publisher(bare_server: CliServer) -> Iterator[httpx.Client]:
    """An HTTP client of `bare_server` keeping its connection: quick one-event publishes."""
    with httpx.Client(base_url=bare_server.url, timeout=5) as client:
        yield client


# -- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is not installed")
    try:
        sync_api = importlib.import_module("playwright.sync_api")
    except ImportError:
        _unavailable("the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        try:
            yield cast("Browser", launched)
        finally:
            launched.close()


@attrs.define
class Tab:
    """A page and what went wrong in it (uncaught exceptions, console errors)."""

    page: Page
    problems: list[str] = attrs.field(factory=list)

    def state(self) -> dict[str, Any]:
        state = self.page.evaluate(STATE_JS)
        assert isinstance(state, dict), "window.demoState is missing"
        return state

    def wait_for(self, condition: str, timeout: float = WAIT_MS) -> dict[str, Any]:
        """Waits until ``condition`` (a JS expression over ``d``, the demoState) holds."""
        script = f"() => {{ const d = window.demoState; return !!d && d.ready && ({condition}); }}"
        try:
            self.page.wait_for_function(script, timeout=timeout, polling=50)
        except Exception as error:  # Playwright's TimeoutError: say where the page was
            summary = {k: v for k, v in self.state().items() if k != "history"}
            raise AssertionError(f"timed out waiting for {condition!r}: {summary}") from error
        return self.state()


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    opened = Tab(page)

    def on_console(message: ConsoleMessage) -> None:
        # Refused requests (429 polls, the 503 of a test) are logged by Chromium: expected.
        if message.type == "error" and "Failed to load resource" not in message.text:
            opened.problems.append(f"console: {message.text}")

    page.on("pageerror", lambda error: opened.problems.append(f"page error: {error}"))
    page.on("console", on_console)
    try:
        yield opened
    finally:
        context.close()


def assert_exactly_once_in_order(state: dict[str, Any], ids: list[str] | None = None) -> None:
    """The page handled consecutive events, in order, none twice (and exactly *ids*)."""
    history: list[dict[str, Any]] = state["history"]
    assert history, "the page handled no events"
    seqs = [entry["seq"] for entry in history]
    first = seqs[0]
    assert seqs == list(range(first, first + len(seqs))), f"gap or repeat in seqs: {seqs}"
    got = [entry["id"] for entry in history]
    assert all(got), "an event came without an id"
    assert len(set(got)) == len(got), "an id was handled twice"
    if ids is not None:
        assert got == ids, "the page's ids are not the published ones, in order"
    assert state["seqGaps"] == 0
    assert state["seqRepeats"] == 0
    assert state["resets"] == 0


# -- tests --------------------------------------------------------------------------------


def test_demo_page_streams_the_bursty_producer_and_polls_through_a_pause(
    tab: Tab, demo_server: CliServer
) -> None:
    page = tab.page
    page.goto(f"{demo_server.url}/?client_id=e2e-demo")
    page.wait_for_function("() => window.demoState && window.demoState.ready")
    assert page.title() == "trio_stream demo"
    assert page.get_by_test_id("topic").inner_text() == "demo"
    assert page.get_by_test_id("lag-limit").inner_text() == "30"

    # The helper streams /streams/demo: events arrive, in order.
    state = tab.wait_for("d.state === 'open' && d.received >= 3", timeout=10_000)
    assert_exactly_once_in_order(state)
    assert all(entry["source"] == "stream" for entry in state["history"])
    page.wait_for_function(
        "() => Number(document.querySelector('[data-testid=received]').textContent) >= 3"
    )

    # The producer's next burst (~80 events/s for 2 s every 6 s) outruns this client's
    # 20 events/s: the server pauses it 30 events behind, and the helper polls.
    state = tab.wait_for(
        "d.pauses >= 1 && d.polls >= 1 && d.history.some((e) => e.source === 'poll')",
        timeout=12_000,
    )
    assert_exactly_once_in_order(state)
    first_polled = next(i for i, e in enumerate(state["history"]) if e["source"] == "poll")
    assert first_polled > 0, "no event was streamed before the pause"
    # ... and the page says so.
    page.wait_for_function(
        "() => Number(document.querySelector('[data-testid=pauses]').textContent) >= 1"
        " && Number(document.querySelector('[data-testid=polls]').textContent) >= 1"
    )
    assert "paused by the server" in page.get_by_test_id("log").inner_text()

    # Polling keeps going on, still with neither a gap nor a repeat.
    received = state["received"]
    state = tab.wait_for(f"d.received >= {received + 10}", timeout=10_000)
    assert_exactly_once_in_order(state)
    assert state["errors"] == 0

    # The metrics cards fill in from /metrics.
    page.wait_for_function(
        "() => /^\\d/.test(document.querySelector('[data-testid=metric-queue-depth]').textContent)"
    )
    if target := os.environ.get("TRIO_STREAM_E2E_SCREENSHOT"):
        page.screenshot(path=target, full_page=True)
    assert tab.problems == []


def test_slow_page_is_paused_polls_then_resumes_without_gap_or_repeat(
    tab: Tab, demo_server: CliServer
) -> None:
    # A private topic, published by the test, so that the pause and the catching up are
    # deterministic (the demo producer on `demo` never stops).
    topic = "e2e-pause"
    page = tab.page
    page.goto(f"{demo_server.url}/?topic={topic}&slow=1&delay=20&window=8&client_id=e2e-slow")
    tab.wait_for("d.state === 'open'")
    assert page.get_by_test_id("slow-toggle").is_checked()
    assert "ack window 8" in page.get_by_test_id("mode").inner_text()

    # 90 events at once: 3x the lag limit ahead of an ack-mode client with a window of 8.
    ids = publish(demo_server, topic, range(1, 91))
    state = tab.wait_for("d.pauses >= 1")
    assert state["state"] in {"polling", "open"}

    # It polls at its 20 events/s, comes within 15 of the head, and streams again.
    state = tab.wait_for("d.resumes >= 1 && d.state === 'open'", timeout=20_000)
    assert state["polls"] >= 1
    ids += publish(demo_server, topic, range(91, 101))
    state = tab.wait_for("d.received >= 100")
    time.sleep(0.3)  # nothing more may arrive
    state = tab.state()

    assert_exactly_once_in_order(state, ids)
    # (The server may pause the client before sending it any of the burst.)
    sources = [entry["source"] for entry in state["history"]]
    assert "poll" in sources
    last_polled = len(sources) - 1 - sources[::-1].index("poll")
    assert sources[last_polled + 1 :] == ["stream"] * (len(sources) - last_polled - 1)
    assert sources[-10:] == ["stream"] * 10, "after resuming, events are streamed again"
    assert state["acks"] >= 1
    stats = state["stats"]
    assert stats["ackErrors"] == 0
    assert state["errors"] == 0
    assert tab.problems == []


def test_page_survives_a_reconnect_with_a_refused_reopening(
    tab: Tab, demo_server: CliServer
) -> None:
    topic = "e2e-reconnect"
    page = tab.page
    stream_requests: list[str] = []
    handler_errors: list[BaseException] = []
    refuse_next = [False]
    ids: list[str] = []

    def on_stream_request(route: Route, request: Request) -> None:
        stream_requests.append(request.url)
        if not refuse_next[0]:
            route.continue_()
            return
        refuse_next[0] = False
        try:
            # Events published while the page has no connection...
            ids.extend(publish(demo_server, topic, range(11, 21)))
        except BaseException as error:  # reported by the test, not lost in Playwright
            handler_errors.append(error)
        # ...and a reopening the server refuses (as when it is draining).
        route.fulfill(
            status=503,
            content_type="application/json",
            body='{"error": "draining"}',
            headers={"Retry-After": "1"},
        )

    page.route(lambda url: f"/streams/{topic}?" in url, on_stream_request)
    page.goto(f"{demo_server.url}/?topic={topic}&client_id=e2e-reconnect")
    tab.wait_for("d.state === 'open'")
    ids += publish(demo_server, topic, range(1, 11))
    tab.wait_for("d.received >= 10")
    before = len(stream_requests)

    refuse_next[0] = True
    page.get_by_test_id("reconnect-button").click()
    # The helper drops the stream, reopens it (refused: 503), probes, backs off, reopens.
    state = tab.wait_for("d.reconnects >= 2 && d.state === 'open' && d.received >= 20")
    assert not handler_errors, handler_errors
    assert len(stream_requests) >= before + 2
    assert "last_event_id=" in stream_requests[before], "the reopening did not resume"
    ids += publish(demo_server, topic, range(21, 31))
    tab.wait_for("d.received >= 30")
    time.sleep(0.3)  # nothing more may arrive
    state = tab.state()

    assert_exactly_once_in_order(state, ids)
    assert [entry["seq"] for entry in state["history"]] == list(range(1, 31))
    assert all(entry["source"] == "stream" for entry in state["history"])
    assert state["pauses"] == 0
    log = page.get_by_test_id("log").inner_text()
    assert "dropping the connection" in log
    assert tab.problems == []


def test_plain_page_acks_in_ack_mode_against_serve(tab: Tab, bare_server: CliServer) -> None:
    page = tab.page
    page.goto(f"{bare_server.url}/healthz")  # any page of the server's origin
    page.add_script_tag(url="/static/trio-stream.js")
    page.evaluate(
        """() => {
          window.seen = [];
          window.t = TrioStream.open({topic: "e2e-ack"}, {
            ack: 4, clientId: "e2e-ack", ackDelayMs: 10,
            onEvent: (ev) => { window.seen.push(ev.id); },
          });
        }"""
    )
    page.wait_for_function("() => window.t.state === 'open'")
    acked_before = metric(bare_server, "trio_stream_client_buffer_utilization_count")

    # Published by the page itself; with a window of 4, all 40 only arrive if acks do.
    ids = page.evaluate(
        """async () => {
          const batch = Array.from({length: 40}, (_, i) => ({data: "event " + i}));
          const response = await fetch("/streams/e2e-ack", {
            method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify(batch),
          });
          return (await response.json()).ids;
        }"""
    )
    page.wait_for_function("() => window.seen.length >= 40")
    page.wait_for_function(f"() => window.t.stats.lastDeliveredId === {json.dumps(ids[-1])}")
    page.wait_for_function("() => window.t.stats.acks >= 10")
    assert page.evaluate("() => window.seen") == ids
    stats = page.evaluate("() => window.t.stats")
    assert stats["ackErrors"] == 0
    assert stats["errors"] == 0

    deadline = time.monotonic() + 5
    while (acked := metric(bare_server, "trio_stream_client_buffer_utilization_count")) < (
        acked_before + 10
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert acked >= acked_before + 10, (acked_before, acked)
    page.evaluate("() => window.t.close()")
    assert tab.problems == []


def test_helper_streams_two_topics_and_resumes_both_after_a_reconnect(
    tab: Tab, bare_server: CliServer, publisher: httpx.Client
) -> None:
    """``TrioStream.open({topics})`` in ack mode: each event with its topic and name;
    events of both topics published while the page has no connection arrive once."""
    topics = ["e2e-two-a", "e2e-two-b"]
    page = tab.page
    published: list[tuple[str, str | None, str]] = []
    stream_requests: list[str] = []
    publish_on_next = [False]
    handler_errors: list[BaseException] = []

    def publish_two(count: int, phase: str) -> None:
        # One request per event, alternating unevenly: the server accepts them in order.
        for i in range(count):
            topic = topics[0] if i % 3 else topics[1]
            name = "tick" if i % 4 == 0 else None
            item = {"data": f"{phase}-{i}"} | ({"event": name} if name else {})
            response = publisher.post(f"/streams/{topic}", json=item)
            assert response.status_code == 202, response.text
            published.append((topic, name, f"{phase}-{i}"))

    def on_stream_request(route: Route, request: Request) -> None:
        stream_requests.append(request.url)
        if publish_on_next[0]:
            publish_on_next[0] = False
            try:
                publish_two(10, "severed")  # while the page has no stream
            except BaseException as error:  # reported by the test, not lost in Playwright
                handler_errors.append(error)
        route.continue_()

    page.route(lambda url: "/streams?" in url, on_stream_request)
    page.goto(f"{bare_server.url}/healthz")  # any page of the server's origin
    page.add_script_tag(url="/static/trio-stream.js")
    page.evaluate(
        """(topics) => {
          window.seen = [];
          window.t = TrioStream.open({topics}, {
            ack: 4, clientId: "e2e-two", ackDelayMs: 10,
            events: topics.map((topic) => topic + "/tick"),
            onEvent: (ev) => { window.seen.push(ev); },
          });
        }""",
        topics,
    )
    page.wait_for_function("() => window.t.state === 'open'")
    publish_two(10, "first")
    page.wait_for_function("() => window.seen.length >= 10")

    publish_on_next[0] = True
    page.evaluate("() => window.t.reconnect()")
    page.wait_for_function("() => window.seen.length >= 20 && window.t.state === 'open'")
    assert not handler_errors, handler_errors
    publish_two(6, "after")
    page.wait_for_function("() => window.seen.length >= 26")
    time.sleep(0.3)  # nothing more may arrive
    seen: list[dict[str, Any]] = page.evaluate("() => window.seen")
    stats = page.evaluate("() => window.t.stats")
    page.evaluate("() => window.t.close()")

    assert [(ev["topic"], ev["event"], ev["data"]) for ev in seen] == published
    ids = [ev["id"] for ev in seen]
    assert all(ids)
    assert len(set(ids)) == len(ids), "an event was handed out twice"
    assert {ev["source"] for ev in seen} == {"stream"}
    assert len(stream_requests) == 2
    assert "last_event_id=" in stream_requests[1], "the reopening did not resume"
    assert stats["acks"] >= 1
    assert stats["ackErrors"] == 0
    assert stats["errors"] == 0
    assert stats["resets"] == 0
    assert tab.problems == []


def test_helper_polls_through_a_pause_on_one_lagging_topic_and_resumes(
    tab: Tab, demo_server: CliServer
) -> None:
    """One of two topics bursts past the lag limit (30) of an ack-mode page: the helper
    polls ``/streams/_poll`` (events of both topics, with their topics), then streams."""
    quiet, busy = "e2e-lag-quiet", "e2e-lag-busy"
    page = tab.page
    page.goto(f"{demo_server.url}/healthz")
    page.add_script_tag(url="/static/trio-stream.js")
    page.evaluate(
        """(topics) => {
          window.seen = [];
          window.pauses = [];
          window.t = TrioStream.open({topics}, {
            ack: 8, clientId: "e2e-lag", ackDelayMs: 10,
            onEvent: (ev) => { window.seen.push(ev); },
            onPause: (info) => { window.pauses.push(info); },
          });
        }""",
        [quiet, busy],
    )
    page.wait_for_function("() => window.t.state === 'open'")

    def publish_datas(topic: str, datas: list[str]) -> list[tuple[str, str]]:
        """One batch; a data starting with ``noise`` goes in an event named ``noise``."""
        batch = [{"data": d} | ({"event": "noise"} if d.startswith("noise") else {}) for d in datas]
        response = httpx.post(f"{demo_server.url}/streams/{topic}", json=batch, timeout=5)
        assert response.status_code == 202, response.text
        return [(topic, data) for data in datas if not data.startswith("noise")]

    published = publish_datas(quiet, ["q0"]) + publish_datas(busy, ["b0"])
    page.wait_for_function("() => window.seen.length >= 2")
    # 1.5 times the lag limit on one topic at once; then the other goes on. The page
    # listens to no event named "noise": it gets none, whether streamed or polled.
    burst = [f"b{i}" for i in range(1, 46)]
    burst[20:20] = ["noise 1", "noise 2"]
    published += publish_datas(busy, burst)
    published += publish_datas(quiet, ["q1"])
    page.wait_for_function("() => window.t.stats.pauses >= 1")
    page.wait_for_function(
        "() => window.t.stats.resumes >= 1 && window.t.state === 'open'", timeout=20_000
    )
    published += publish_datas(busy, ["b46"]) + publish_datas(quiet, ["q2"])
    page.wait_for_function(f"() => window.seen.length >= {len(published)}")
    time.sleep(0.3)  # nothing more may arrive
    seen: list[dict[str, Any]] = page.evaluate("() => window.seen")
    pauses: list[dict[str, Any]] = page.evaluate("() => window.pauses")
    stats = page.evaluate("() => window.t.stats")
    page.evaluate("() => window.t.close()")

    assert [(ev["topic"], ev["data"]) for ev in seen] == published
    assert all(ev["event"] is None for ev in seen)
    ids = [ev["id"] for ev in seen]
    assert all(ids)
    assert len(set(ids)) == len(ids), "an event was handed out twice"
    sources = [ev["source"] for ev in seen]
    # (Polled events name their topic in JSON: not the helper's first topic, here.)
    assert busy in {ev["topic"] for ev in seen if ev["source"] == "poll"}
    assert sources[-2:] == ["stream", "stream"], "after resuming, events are streamed again"
    assert pauses[0]["topic"] == busy
    assert "/streams/_poll?" in pauses[0]["poll_url"]
    assert stats["acks"] >= 1
    assert stats["ackErrors"] == 0
    assert stats["errors"] == 0
    assert stats["resets"] == 0
    assert tab.problems == []
