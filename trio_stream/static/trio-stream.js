/*
 * trio-stream.js: the browser helper for trio_stream's Server-Sent Events streams.
 *
 * Served by the app at /static/trio-stream.js. A classic script with no dependencies and
 * no build step; it defines `TrioStream` on the global object (`window.TrioStream`):
 *
 *     <script src="/static/trio-stream.js"></script>
 *     <script>
 *       const stream = TrioStream.open({topic: "prices"}, {
 *         ack: 32,                          // ack mode, window of 32 (omit for plain streaming)
 *         onEvent(ev) { show(ev.data); },   // may return a Promise: the next event waits for it
 *         onState(s) { status.textContent = s.state; },
 *       });
 *       stream.on("reset", (info) => console.warn("events were lost", info));
 *       // later: stream.close();
 *     </script>
 *
 * Why a helper: a native EventSource already reconnects with Last-Event-ID after a dropped
 * connection, but it stops for good on any non-200 answer, such as the 429 a paused client
 * gets, and it can neither poll nor acknowledge. The helper does what trio_stream's HTTP
 * contract asks of a client:
 *   - tracks the last event id, so every reopening resumes exactly (no gap, no repeat);
 *   - `event: reset` (events lost): reported as a "reset", and the stream goes on;
 *   - `event: pause`: closes the EventSource, waits `retry_after_ms`, polls `poll_url`
 *     (honouring 429 + Retry-After), delivers the polled events in order as if streamed,
 *     and reopens the stream once a poll answers `resume_stream: true`;
 *   - when the browser gives up (readyState CLOSED, e.g. on a 429), probes the stream URL
 *     with fetch: a pause (429 + X-Stream-Pause) switches to polling; anything else backs
 *     off (Retry-After when present, else exponential with jitter) and reopens;
 *   - ack mode (`?ack=N`): POSTs cumulative acks with its own buffer utilization.
 *
 * TrioStream.open(target, options) -> TrioStream.Stream
 *   target: a URL string ("/streams/prices", "/streams?topic=a&topic=b", absolute URLs),
 *     {topic: "prices"} or {topics: ["a", "b"]}.
 *   options (all optional):
 *     clientId        the client id, 1-128 of [A-Za-z0-9._:-]. Default: a `client_id`
 *                     already in the URL, else a random one (EventSource cannot read the
 *                     X-Client-ID the server would assign, and acks need the id). Pass
 *                     null to send none. With --auth-secret, pass the token's `sub`.
 *     ack             false (default) | true (`?ack`: the server's default window, taken
 *                     as 64 for batching acks; a smaller one only delays acks by ackDelayMs)
 *                     | N (`?ack=N`).
 *     lastEventId     resume after this id (also read from a `last_event_id` URL parameter).
 *     events          extra event names to listen for (see "Event names" below).
 *     bufferCapacity  the size of the helper's queue of events waiting for the handlers.
 *                     Default: N in ack mode, 64 for `ack: true`, else 1000. Utilization
 *                     reported in acks is queued / bufferCapacity. Without ack mode, when
 *                     the queue overflows the helper closes the EventSource until the queue
 *                     is half empty, then reopens it from the last received id.
 *     ackDelayMs      coalescing delay for acks (default 25). An ack also goes out at once
 *                     after every max(1, floor(N / 2)) events, so the window never runs dry.
 *     pollLimit       `limit` for polls (default 100; fewer when the queue is fuller).
 *     pollIntervalMs  pause between polls that returned no events (default 500).
 *     pollPaceMs      first spacing of polls that returned events (default 100): doubled
 *                     after a 429 (up to 2 s), shortened while polls come back full.
 *     minBackoffMs, maxBackoffMs   reopen backoff bounds (default 500, 30000).
 *     withCredentials cross-origin: send cookies with the stream, polls and acks.
 *     base            prefix for {topic}/{topics} targets, e.g. "https://host:8000".
 *     ackUrl          override the ack endpoint (derived from the URL otherwise).
 *     onEvent, onState, onReset, onPause, onPoll, onResume, onReconnect, onAck, onError,
 *     onReauth        shorthands for stream.on("event" | "state" | ..., fn).
 *
 * The Stream object:
 *   on(type, fn) -> unsubscribe function; off(type, fn);
 *   addEventListener(type, fn) / removeEventListener(type, fn) (aliases);
 *   close()      stop for good: closes the EventSource, cancels polls and timers, drops the
 *                queue, and sends a last ack (keepalive) if one is owed;
 *   reconnect()  drop the connection and reopen it from the last received id;
 *   listen(name) also deliver events named `name` (see below);
 *   properties: state, clientId, topics, lastEventId (last received), lastDeliveredId (last
 *     handed to the "event" listeners: pass it as `lastEventId` to a new stream after
 *     close() to go on with neither a gap nor a repeat),
 *     queued, bufferUtilization, stats (a snapshot: received, delivered, pauses, resumes,
 *     resets, reconnects, polls, acks, ackErrors, errors, ...).
 *
 * Listener payloads (one argument each):
 *   "event"     {id, event, data, topic, source}: `event` is the event's own name or null,
 *               `topic` its topic (with several topics, the wire's "<topic>/<name>" is split
 *               into the two), `data` the string payload, `source` "stream" | "poll". In
 *               order, never twice; with several topics `id` is the stream's composite cursor.
 *               Listeners run one event at a time: when one returns a Promise, the next event
 *               waits for it; the event counts as processed (and is acked) after that.
 *               After close() no listener is called again.
 *   "state"     {state, previous, ...detail}, state one of "connecting", "open",
 *               "reconnecting" (the browser's own retry), "polling" (paused by the server),
 *               "backoff" (waiting to reopen), "suspended" (own queue full), "closed".
 *   "reset"     {reason, last_event_id, topic?, source}: events were lost; the stream goes on.
 *               From a poll answering `reset: true`, reason is "expired" and last_event_id
 *               the `after` that was no longer retained.
 *   "pause"     {poll_url, retry_after_ms, topic?, source: "stream" | "probe"}.
 *   "poll"      {events, last_event_id, reset, resume_stream}: after each answered poll.
 *   "resume"    {last_event_id}: polling caught up, the stream is being reopened.
 *   "reconnect" {cause: "native" | "error" | "manual" | "drained", delay_ms?}.
 *   "ack"       {last_event_id, buffer_utilization}.
 *   "reauth"    {}: the server ended the stream because the token expired.
 *   "error"     {message, status?, body?, fatal}: fatal ones (a 400 or 404 answering the
 *               stream or a poll) close the stream; others are retried with backoff.
 *
 * Event names. EventSource hands a named event only to listeners of exactly that name.
 * One topic (/streams/t): unnamed events arrive (as "message"); named ones only when their
 * names are given in `events` or to listen(). Several topics (/streams?topic=a&topic=b): the
 * server names each event `<topic>` or `<topic>/<name>`; the helper listens to every topic
 * name, and to "<topic>/<name>" names given in `events`. Polled events are filtered the
 * same way, so a page gets the same events whether they were streamed or polled. In ack
 * mode, list every name a topic may carry: events nobody listens to are acknowledged only
 * with a later one, so a window's worth of them in a row stalls the stream (until the
 * server pauses it, or closes it for want of acks). The names "reset", "pause", "reauth",
 * "open" and "error" are taken by control events and EventSource itself: they cannot be
 * used as event names (or, with several topics, topic names) through this helper.
 *
 * Cookies: EventSource sends same-origin cookies (e.g. `trio_stream_token`); polls and acks
 * use fetch with credentials "same-origin" ("include" with `withCredentials`). Comments
 * (heartbeats) are invisible to EventSource, so a silent dead connection is left to the
 * server's and the browser's timeouts.
 */
(function (root) {
  "use strict";

  const VERSION = "0.1.0";
  const ID_RE = /^[A-Za-z0-9._:-]{1,128}$/;
  const PROBE_TIMEOUT_MS = 10000;
  const MIN_POLL_PACE_MS = 20;
  const MAX_POLL_PACE_MS = 2000;
  // Names EventSource or the contract use for something else than data events.
  const RESERVED = new Set(["reset", "pause", "reauth", "open", "error"]);

  function randomClientId() {
    const c = root.crypto;
    let token;
    if (c && typeof c.randomUUID === "function") {
      token = c.randomUUID(); // secure contexts only (https, localhost)
    } else {
      const bytes = new Uint8Array(16);
      if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
      else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
      token = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    }
    return ("web-" + token).replace(/[^A-Za-z0-9._:-]/g, "");
  }

  function parseJson(text) {
    try {
      const value = JSON.parse(text);
      return value && typeof value === "object" ? value : null;
    } catch (_err) {
      return null;
    }
  }

  /** Retry-After in milliseconds (delta-seconds or HTTP date), or null. */
  function retryAfterMs(response) {
    const value = response.headers.get("Retry-After");
    if (!value) return null;
    if (/^\s*\d+(\.\d+)?\s*$/.test(value)) return Math.round(parseFloat(value) * 1000);
    const date = Date.parse(value);
    return Number.isNaN(date) ? null : Math.max(0, date - Date.now());
  }

  /** Works out the stream URL, topics and ack/poll endpoints from a target. */
  function resolveTarget(target, base) {
    const here = root.location ? root.location.href : undefined;
    const prefix = base ? String(base).replace(/\/+$/, "") : "";
    let url;
    if (typeof target === "string" || (root.URL && target instanceof root.URL)) {
      url = new URL(String(target), here);
    } else if (target && typeof target.topic === "string") {
      url = new URL(prefix + "/streams/" + encodeURIComponent(target.topic), here);
    } else if (target && Array.isArray(target.topics) && target.topics.length) {
      url = new URL(prefix + "/streams", here);
      for (const topic of target.topics) url.searchParams.append("topic", String(topic));
    } else {
      throw new TypeError("TrioStream.open: expected a URL, {topic} or {topics: [...]}");
    }
    const path = url.pathname;
    const single = /^(.*\/streams)\/([^/]+?)\/?$/.exec(path);
    if (single && !single[2].startsWith("_")) {
      const stem = single[1] + "/" + single[2];
      return {
        url,
        multi: false,
        topics: [decodeURIComponent(single[2])],
        ackPath: stem + "/ack",
        pollPath: stem + "/poll",
      };
    }
    const topics = url.searchParams.getAll("topic");
    if (/\/streams\/?$/.test(path) && topics.length) {
      const stem = path.replace(/\/+$/, "");
      return { url, multi: true, topics, ackPath: stem + "/_ack", pollPath: stem + "/_poll" };
    }
    return { url, multi: false, topics: [], ackPath: null, pollPath: null };
  }

  class Stream {
    constructor(target, options) {
      const opts = Object.assign({}, options || {});
      const where = resolveTarget(target, opts.base);
      const params = where.url.searchParams;

      this._url = where.url; // the stream URL as given; see _streamUrl()
      this._multi = where.multi;
      this._topics = where.topics;
      this._pollPath = where.pollPath;

      // Identity: an explicit option, else the URL's client_id, else a random id.
      let clientId = opts.clientId;
      if (clientId === undefined) clientId = params.get("client_id") || randomClientId();
      if (clientId !== null && !ID_RE.test(String(clientId))) {
        throw new TypeError("TrioStream.open: clientId must be 1-128 of [A-Za-z0-9._:-]");
      }
      this.clientId = clientId === null ? null : String(clientId);

      // Ack mode: the option wins over an `ack` already in the URL.
      let ack = opts.ack;
      if (ack === undefined && params.has("ack")) ack = params.get("ack") === "" ? true : params.get("ack");
      if (ack === true || ack === false || ack === undefined || ack === null) {
        this._ack = ack === true;
      } else {
        const n = Number(ack);
        if (!Number.isInteger(n) || n < 1 || n > 10000) {
          throw new RangeError("TrioStream.open: ack must be true or an integer from 1 to 10000");
        }
        this._ack = n;
      }
      this._window = typeof this._ack === "number" ? this._ack : 64;
      this._ackEvery = Math.max(1, Math.floor(this._window / 2));
      this._ackUrl = opts.ackUrl
        ? new URL(opts.ackUrl, this._url).href
        : where.ackPath && new URL(where.ackPath, this._url).href;
      if (this._ack && (!this._ackUrl || !this.clientId)) {
        throw new TypeError("TrioStream.open: ack mode needs a client id and a /streams URL");
      }

      const cap = Number(opts.bufferCapacity);
      this._capacity = cap >= 1 ? Math.floor(cap) : this._ack ? this._window : 1000;
      this._ackDelayMs = opts.ackDelayMs >= 0 ? Number(opts.ackDelayMs) : 25;
      this._pollLimit = opts.pollLimit >= 1 ? Math.min(1000, Math.floor(opts.pollLimit)) : 100;
      this._pollIntervalMs = opts.pollIntervalMs >= 0 ? Number(opts.pollIntervalMs) : 500;
      this._pollPaceMs = opts.pollPaceMs >= MIN_POLL_PACE_MS ? Number(opts.pollPaceMs) : 100;
      this._minBackoffMs = opts.minBackoffMs >= 0 ? Number(opts.minBackoffMs) : 500;
      this._maxBackoffMs = opts.maxBackoffMs >= 0 ? Number(opts.maxBackoffMs) : 30000;
      this._withCredentials = !!opts.withCredentials;
      this._credentials = this._withCredentials ? "include" : "same-origin";

      // Names EventSource should dispatch to us ("message": events without a name).
      this._names = new Set(["message"]);
      for (const name of this._multi ? this._topics : []) this.listen(name);
      for (const name of opts.events || []) this.listen(name);

      this._state = "idle";
      this._closed = false;
      this._gen = 0; // bumped whenever the current mode (stream, poll, backoff) is abandoned
      this._es = null;
      this._timers = new Set();
      this._abort = new AbortController(); // aborts every fetch on close()
      this._listeners = new Map();
      this._backoffMs = 0;

      this._lastEventId = opts.lastEventId || params.get("last_event_id") || null;
      this._lastDeliveredId = this._lastEventId;
      this._queue = [];
      this._draining = false;
      this._roomWaiters = [];

      this._ackTarget = null; // last processed id that came from the stream
      this._ackedId = null;
      this._unacked = 0;
      this._ackTimer = null;
      this._ackInFlight = false;

      this._stats = {
        received: 0,
        delivered: 0,
        pauses: 0,
        resumes: 0,
        resets: 0,
        reconnects: 0,
        polls: 0,
        polledEvents: 0,
        acks: 0,
        ackErrors: 0,
        errors: 0,
      };

      for (const key of Object.keys(opts)) {
        const match = /^on([A-Z]\w*)$/.exec(key);
        if (match && typeof opts[key] === "function") this.on(match[1].toLowerCase(), opts[key]);
      }
      // Connect once the caller has the object: listeners added right after open() see
      // everything, and callbacks never run inside open().
      queueMicrotask(() => {
        if (!this._closed) this._openEventSource("open");
      });
    }

    // ----- public surface -------------------------------------------------------------

    get state() {
      return this._state;
    }
    get topics() {
      return this._topics.slice();
    }
    get lastEventId() {
      return this._lastEventId;
    }
    get lastDeliveredId() {
      return this._lastDeliveredId;
    }
    get queued() {
      return this._queue.length;
    }
    get bufferUtilization() {
      return Math.min(1, this._queue.length / this._capacity);
    }
    get stats() {
      return Object.assign({}, this._stats, {
        state: this._state,
        queued: this._queue.length,
        bufferUtilization: this.bufferUtilization,
        lastEventId: this._lastEventId,
        lastDeliveredId: this._lastDeliveredId,
      });
    }

    on(type, fn) {
      if (typeof fn !== "function") throw new TypeError("listener must be a function");
      if (!this._listeners.has(type)) this._listeners.set(type, new Set());
      this._listeners.get(type).add(fn);
      return () => this.off(type, fn);
    }
    off(type, fn) {
      const set = this._listeners.get(type);
      if (set) set.delete(fn);
    }
    addEventListener(type, fn) {
      this.on(type, fn);
    }
    removeEventListener(type, fn) {
      this.off(type, fn);
    }

    /** Also deliver events named `name` (for several topics: "<topic>/<name>"). */
    listen(name) {
      name = String(name);
      if (this._names.has(name)) return;
      if (RESERVED.has(name)) throw new RangeError("TrioStream: reserved event name " + name);
      this._names.add(name);
      if (this._es) this._es.addEventListener(name, this._esHandlers.data);
    }

    close() {
      if (this._closed) return;
      this._sendFinalAck();
      this._closed = true;
      this._gen++;
      this._closeEventSource();
      for (const id of this._timers) clearTimeout(id);
      this._timers.clear();
      this._ackTimer = null;
      this._abort.abort();
      this._queue.length = 0;
      this._roomWaiters.length = 0;
      this._setState("closed");
    }

    reconnect() {
      if (this._closed) return;
      this._stats.reconnects++;
      this._emit("reconnect", { cause: "manual" });
      this._openEventSource("manual");
    }

    // ----- events and state -----------------------------------------------------------

    _emit(type, detail) {
      const set = this._listeners.get(type);
      if (!set) return;
      for (const fn of Array.from(set)) {
        try {
          fn(detail);
        } catch (err) {
          this._listenerFailed(err);
        }
      }
    }

    _listenerFailed(err) {
      if (root.console) root.console.error("TrioStream listener failed:", err);
    }

    _error(message, extra) {
      this._stats.errors++;
      this._emit("error", Object.assign({ message, fatal: false }, extra));
    }

    _setState(state, detail) {
      if (state === this._state) return;
      const previous = this._state;
      this._state = state;
      this._emit("state", Object.assign({ state, previous }, detail));
    }

    _setTimer(fn, ms) {
      const id = setTimeout(() => {
        this._timers.delete(id);
        fn();
      }, Math.max(0, ms));
      this._timers.add(id);
      return id;
    }

    _clearTimer(id) {
      if (id === null) return;
      clearTimeout(id);
      this._timers.delete(id);
    }

    _sleep(ms) {
      return new Promise((resolve) => this._setTimer(resolve, ms));
    }

    _fetch(url, init) {
      return fetch(
        url,
        Object.assign({ credentials: this._credentials, signal: this._abort.signal }, init),
      );
    }

    _nextBackoff() {
      this._backoffMs = this._backoffMs
        ? Math.min(this._maxBackoffMs, this._backoffMs * 2)
        : this._minBackoffMs;
      return Math.round(this._backoffMs * (0.75 + Math.random() * 0.5));
    }

    // ----- the EventSource --------------------------------------------------------------

    /** The stream URL for (re)opening: client id, resume point and ack mode applied. */
    _streamUrl() {
      const url = new URL(this._url.href);
      const params = url.searchParams;
      params.delete("ack");
      params.delete("last_event_id");
      if (this.clientId) params.set("client_id", this.clientId);
      if (this._lastEventId) params.set("last_event_id", this._lastEventId);
      let query = params.toString();
      if (this._ack) {
        // A bare `ack` asks for the server's default window (URLSearchParams would write "ack=").
        query += (query ? "&" : "") + (this._ack === true ? "ack" : "ack=" + this._ack);
      }
      url.search = query;
      return url.href;
    }

    _openEventSource(cause) {
      this._closeEventSource();
      const gen = ++this._gen;
      const es = new EventSource(this._streamUrl(), { withCredentials: this._withCredentials });
      const guard = (fn) => (e) => {
        if (gen === this._gen && !this._closed) fn.call(this, e, es);
      };
      this._esHandlers = {
        data: guard(this._onStreamEvent),
        reset: guard(this._onStreamReset),
        pause: guard(this._onStreamPause),
        reauth: guard(() => this._emit("reauth", {})),
      };
      es.onopen = guard(() => {
        this._backoffMs = 0;
        this._setState("open");
      });
      es.onerror = guard(this._onStreamError);
      for (const name of this._names) es.addEventListener(name, this._esHandlers.data);
      for (const name of ["reset", "pause", "reauth"]) {
        es.addEventListener(name, this._esHandlers[name]);
      }
      this._es = es;
      this._setState("connecting", { cause });
    }

    _closeEventSource() {
      if (!this._es) return;
      this._es.onopen = this._es.onerror = null;
      this._es.close();
      this._es = null;
    }

    _onStreamEvent(e) {
      // EventSource keeps the last id for events without an `id:` line; trio_stream gives
      // every data event an id, so this is the event's own id.
      const id = e.lastEventId || null;
      if (id) this._lastEventId = id;
      let topic = this._topics[0] || null;
      let name = e.type === "message" ? null : e.type;
      if (this._multi) {
        const slash = e.type.indexOf("/");
        topic = slash < 0 ? e.type : e.type.slice(0, slash);
        name = slash < 0 ? null : e.type.slice(slash + 1);
      }
      this._enqueue({ id, event: name, data: e.data, topic, source: "stream" });
    }

    /** Whether EventSource would hand `ev` to us: its name on the wire is listened to. */
    _listensTo(ev) {
      let name = ev.event === null ? "message" : ev.event;
      if (this._multi) name = ev.event === null ? ev.topic : ev.topic + "/" + ev.event;
      return this._names.has(name);
    }

    _onStreamReset(e) {
      const info = parseJson(e.data) || { reason: "unknown" };
      this._stats.resets++;
      this._emit("reset", Object.assign({}, info, { source: "stream" }));
    }

    _onStreamPause(e) {
      const info = parseJson(e.data) || {};
      this._closeEventSource();
      this._startPolling(info.poll_url, Number(info.retry_after_ms) || 0, info, "stream");
    }

    _onStreamError(_e, es) {
      if (es.readyState === EventSource.CONNECTING) {
        // The browser reconnects by itself (after the `retry:` delay) with Last-Event-ID.
        if (this._state === "open") {
          this._stats.reconnects++;
          this._emit("reconnect", { cause: "native" });
        }
        this._setState("reconnecting");
        return;
      }
      // CLOSED: the browser gave up, e.g. on a 429. Ask the server why.
      this._closeEventSource();
      this._setState("reconnecting", { cause: "refused" });
      this._probe(++this._gen);
    }

    /** Learns with fetch why the stream was refused: a pause, a limit, or an error. */
    async _probe(gen) {
      const controller = new AbortController();
      const abort = () => controller.abort();
      this._abort.signal.addEventListener("abort", abort);
      const timeout = this._setTimer(abort, PROBE_TIMEOUT_MS);
      let response;
      try {
        response = await fetch(this._streamUrl(), {
          credentials: this._credentials,
          cache: "no-store",
          headers: { Accept: "text/event-stream" },
          signal: controller.signal,
        });
      } catch (err) {
        this._clearTimer(timeout);
        this._abort.signal.removeEventListener("abort", abort);
        if (gen === this._gen && !this._closed) this._scheduleReopen(null, "network error");
        return;
      }
      const status = response.status;
      let body = null;
      if (status !== 200) {
        body = parseJson(await response.text().catch(() => ""));
      }
      controller.abort(); // a 200 here is a live stream: drop it, EventSource reopens below
      this._clearTimer(timeout);
      this._abort.signal.removeEventListener("abort", abort);
      if (gen !== this._gen || this._closed) return;

      const pauseHeader = (response.headers.get("X-Stream-Pause") || "").toLowerCase();
      if (status === 429 && (pauseHeader === "true" || (body && body.error === "paused"))) {
        const info = Object.assign({}, body);
        this._startPolling(info.poll_url, retryAfterMs(response) || 0, info, "probe");
      } else if (status === 400 || status === 404) {
        this._fail("stream refused: HTTP " + status, { status, body });
      } else if (status === 200) {
        this._scheduleReopen(null, "stream closed by the browser");
      } else {
        this._error("stream refused: HTTP " + status, { status, body });
        this._scheduleReopen(retryAfterMs(response), "HTTP " + status);
      }
    }

    _scheduleReopen(delayMs, reason) {
      const gen = ++this._gen;
      const delay = delayMs === null || delayMs === undefined ? this._nextBackoff() : delayMs;
      this._setState("backoff", { reason, delay_ms: delay });
      this._setTimer(() => {
        if (gen !== this._gen || this._closed) return;
        this._stats.reconnects++;
        this._emit("reconnect", { cause: "error", delay_ms: delay });
        this._openEventSource("error");
      }, delay);
    }

    _fail(message, extra) {
      this._error(message, Object.assign({ fatal: true }, extra));
      this.close();
    }

    // ----- the queue of events waiting for the handlers --------------------------------

    _enqueue(ev) {
      this._queue.push(ev);
      this._stats.received++;
      if (!this._draining) this._drain();
      if (this._es && this._queue.length > this._capacity) {
        // Our own backpressure: stop reading until the handlers catch up.
        this._closeEventSource();
        this._gen++;
        this._setState("suspended", { queued: this._queue.length });
      }
    }

    async _drain() {
      this._draining = true;
      try {
        while (this._queue.length && !this._closed) {
          const ev = this._queue[0]; // stays queued (counted in utilization) while processed
          this._stats.delivered++;
          if (ev.id) this._lastDeliveredId = ev.id;
          const pending = this._dispatchEvent(ev);
          if (pending.length) {
            try {
              await Promise.all(pending);
            } catch (err) {
              this._listenerFailed(err);
            }
          }
          if (this._closed) return; // a listener may have closed the stream
          this._queue.shift();
          this._processed(ev);
          this._queueShrunk();
        }
      } finally {
        this._draining = false;
      }
    }

    /** Calls the "event" listeners; returns the promises some of them returned. */
    _dispatchEvent(ev) {
      const pending = [];
      const set = this._listeners.get("event");
      if (set) {
        for (const fn of Array.from(set)) {
          try {
            const result = fn(ev);
            if (result && typeof result.then === "function") pending.push(result);
          } catch (err) {
            this._listenerFailed(err);
          }
        }
      }
      return pending;
    }

    _processed(ev) {
      // Only ids sent on a stream are acked: the first ack after a resume covers the polled
      // ones too, since acks are cumulative.
      if (this._ack && ev.source === "stream" && ev.id) {
        this._ackTarget = ev.id;
        this._unacked++;
        this._scheduleAck();
      }
    }

    _queueShrunk() {
      if (this._state !== "suspended" && !this._roomWaiters.length) return;
      if (this._queue.length > Math.floor(this._capacity / 2)) return;
      if (this._state === "suspended") {
        this._stats.reconnects++;
        this._emit("reconnect", { cause: "drained" });
        this._openEventSource("drained");
      }
      const waiters = this._roomWaiters.splice(0);
      for (const resolve of waiters) resolve();
    }

    /** Resolves once the queue is at most half full. */
    _waitForRoom() {
      if (this._queue.length <= Math.floor(this._capacity / 2)) return Promise.resolve();
      return new Promise((resolve) => this._roomWaiters.push(resolve));
    }

    // ----- acks ----------------------------------------------------------------------

    _scheduleAck() {
      if (this._ackInFlight) return; // the reply schedules the next one
      if (this._unacked >= this._ackEvery) {
        this._flushAck();
      } else if (this._ackTimer === null) {
        this._ackTimer = this._setTimer(() => {
          this._ackTimer = null;
          this._flushAck();
        }, this._ackDelayMs);
      }
    }

    _ackBody(id) {
      return JSON.stringify({
        client_id: this.clientId,
        last_event_id: id,
        buffer_utilization: this.bufferUtilization,
      });
    }

    async _flushAck() {
      this._clearTimer(this._ackTimer);
      this._ackTimer = null;
      const id = this._ackTarget;
      if (this._ackInFlight || this._closed || !id || id === this._ackedId) return;
      this._ackInFlight = true;
      const utilization = this.bufferUtilization;
      const count = this._unacked;
      this._unacked = 0;
      let retryMs = null;
      try {
        const response = await this._fetch(this._ackUrl, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: this._ackBody(id),
        });
        if (response.ok) {
          this._ackedId = id;
          this._stats.acks++;
          this._emit("ack", { last_event_id: id, buffer_utilization: utilization });
        } else {
          this._stats.ackErrors++;
          const body = parseJson(await response.text().catch(() => ""));
          this._error("ack refused: HTTP " + response.status, { status: response.status, body });
          if (response.status >= 500 || response.status === 429) {
            retryMs = retryAfterMs(response) || 1000;
            this._unacked += count;
          } else {
            this._ackedId = id; // 404/409/4xx: the same id would be refused again
          }
        }
      } catch (err) {
        if (this._closed) return;
        this._stats.ackErrors++;
        this._error("ack failed: " + (err && err.message ? err.message : err), {});
        retryMs = 1000;
        this._unacked += count;
      } finally {
        this._ackInFlight = false;
      }
      if (this._closed || this._ackTarget === this._ackedId) return;
      if (retryMs !== null) {
        if (this._ackTimer === null) {
          this._ackTimer = this._setTimer(() => {
            this._ackTimer = null;
            this._flushAck();
          }, retryMs);
        }
      } else {
        this._scheduleAck();
      }
    }

    _sendFinalAck() {
      const id = this._ackTarget;
      if (!this._ack || !id || id === this._ackedId || this._ackInFlight) return;
      fetch(this._ackUrl, {
        method: "POST",
        credentials: this._credentials,
        keepalive: true,
        headers: { "Content-Type": "application/json" },
        body: this._ackBody(id),
      }).catch(() => {});
    }

    // ----- pause: polling until the server lets us stream again ----------------------

    _fallbackPollUrl() {
      if (!this._pollPath) return null;
      const url = new URL(this._pollPath, this._url);
      if (this._multi) for (const topic of this._topics) url.searchParams.append("topic", topic);
      if (this._lastEventId) url.searchParams.set("after", this._lastEventId);
      return url.href;
    }

    _startPolling(pollUrl, delayMs, info, source) {
      const target = pollUrl || this._fallbackPollUrl();
      const gen = ++this._gen;
      this._stats.pauses++;
      const detail = Object.assign({}, info, { retry_after_ms: delayMs, source });
      this._setState("polling", detail);
      this._emit("pause", detail);
      if (!target) {
        this._scheduleReopen(delayMs, "paused, and no poll URL");
        return;
      }
      const url = new URL(target, this._url);
      // A pause event's `after` is the last id sent on this stream: ours. A refused stream's
      // is the last id the server sent this client on some earlier stream, which a client
      // resuming from an older id (a new page, events lost with a dropped connection) has
      // not seen: poll from our own.
      if (source === "probe" && this._lastEventId) url.searchParams.set("after", this._lastEventId);
      this._pollLoop(gen, url, delayMs);
    }

    async _pollLoop(gen, url, delayMs) {
      const live = () => gen === this._gen && !this._closed;
      if (this.clientId && !url.searchParams.has("client_id")) {
        url.searchParams.set("client_id", this.clientId);
      }
      // Polls are paced: the server answers a poll made with an empty bucket with a 429 and a
      // Retry-After rounded up to whole seconds, so polling too eagerly costs a second each
      // time. The spacing doubles after a 429 and shrinks while polls come back full.
      let pace = this._pollPaceMs;
      let wait = delayMs;
      while (live()) {
        if (wait > 0) await this._sleep(wait);
        if (!live()) return;
        await this._waitForRoom();
        if (!live()) return;
        const room = Math.max(1, this._capacity - this._queue.length);
        const limit = Math.min(this._pollLimit, room);
        url.searchParams.set("limit", String(limit));

        let response;
        let body = null;
        try {
          response = await this._fetch(url.href, {
            cache: "no-store",
            headers: { Accept: "application/json" },
          });
          if (response.status !== 429) body = parseJson(await response.text());
        } catch (err) {
          if (!live()) return;
          this._error("poll failed: " + (err && err.message ? err.message : err), {});
          wait = this._nextBackoff();
          continue;
        }
        if (!live()) return;
        if (response.status === 429) {
          // Our rate limit: come back when the next token is due, and poll less often.
          pace = Math.min(MAX_POLL_PACE_MS, pace * 2);
          const due = retryAfterMs(response);
          wait = due === null ? pace : due;
          continue;
        }
        if (!response.ok || !body) {
          const status = response.status;
          if (status === 400 || status === 404) {
            this._fail("poll refused: HTTP " + status, { status, body });
            return;
          }
          this._error("poll refused: HTTP " + status, { status, body });
          wait = retryAfterMs(response) || this._nextBackoff();
          continue;
        }
        this._backoffMs = 0;
        this._stats.polls++;
        const after = url.searchParams.get("after");
        if (body.reset) {
          this._stats.resets++;
          this._emit("reset", { reason: "expired", last_event_id: after, source: "poll" });
        }
        const events = Array.isArray(body.events) ? body.events : [];
        for (const raw of events) {
          const ev = {
            id: raw.id == null ? null : String(raw.id),
            event: raw.event == null ? null : String(raw.event),
            data: raw.data == null ? "" : String(raw.data),
            topic: raw.topic == null ? this._topics[0] || null : String(raw.topic),
            source: "poll",
          };
          if (ev.id) this._lastEventId = ev.id;
          this._stats.polledEvents++;
          // What the stream would not have dispatched to us, the poll does not deliver.
          if (this._listensTo(ev)) this._enqueue(ev);
        }
        if (body.last_event_id) {
          this._lastEventId = String(body.last_event_id);
          url.searchParams.set("after", this._lastEventId);
        }
        this._emit("poll", {
          events: events.length,
          last_event_id: this._lastEventId,
          reset: !!body.reset,
          resume_stream: !!body.resume_stream,
        });
        if (body.resume_stream) {
          this._stats.resumes++;
          this._emit("resume", { last_event_id: this._lastEventId });
          this._openEventSource("resume");
          return;
        }
        if (events.length >= limit) pace = Math.max(MIN_POLL_PACE_MS, pace * 0.7);
        wait = events.length ? pace : this._pollIntervalMs;
      }
    }
  }

  const TrioStream = {
    version: VERSION,
    Stream,
    open(target, options) {
      return new Stream(target, options);
    },
    randomClientId,
  };

  root.TrioStream = TrioStream;
  if (typeof module === "object" && module && module.exports) module.exports = TrioStream;
})(typeof window !== "undefined" ? window : globalThis);
