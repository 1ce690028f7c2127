/**
 * etherd realtime client: one module, no DOM code, no dependencies.
 *
 * Follows topics of an etherd server over one WebSocket (or Server-Sent Events) and hands
 * every event to the caller once, in offset order per topic, across reconnects:
 *
 * - subscribes with `since` when it knows a topic's position, so the server replays exactly
 *   what was missed (no gap, no duplicate); events at or below the position are dropped;
 * - reconnects after any drop with exponential backoff and jitter, and says so through
 *   `state` events (`connecting`, `open`, `reconnecting`, `unauthorized`, `closed`);
 * - emits `reset` when the server cannot resume a topic (`recovered: false`, or SSE's
 *   `reset` event): the caller reloads that topic's state over HTTP, and the client goes on
 *   from the offset the server named;
 * - uses SSE (one EventSource per topic, resuming with `Last-Event-ID` or `?since=`) when
 *   `GET /api/realtime/config` says `prefer_websocket: false` or a WebSocket cannot be opened;
 * - renews the token before it expires with the WebSocket `refresh` action, and falls back
 *   to reconnecting with the new token when the server does not know that action (or the
 *   new token names another subject or role).
 *
 * Usage:
 *
 *     import { RealtimeClient } from "/client.js";
 *     const rt = new RealtimeClient({ baseUrl: "http://127.0.0.1:8080", token: () => "test" });
 *     rt.on("event", (ev) => console.log(ev.topic, ev.offset, ev.event, ev));
 *     rt.on("reset", ({ topic }) => reloadOverHttp(topic));
 *     rt.subscribe("tasks/task_abc", { since: 0 });   // replay everything retained, then live
 *
 * Works in browsers and in Node 20 (pass `WebSocket`, `EventSource` and `fetch` there).
 * @module etherd-realtime-client
 */

/** Event names an SSE stream is listened to for by default (EventSource needs each name). */
export const EVENT_NAMES = Object.freeze([
  "os.harness.step",
  "task.interrupted",
  "task.resumed",
  "task.delivered",
  "task.failed",
  "task.timeline",
  "activity.list_updated",
  "task.harness.ready",
]);

/** WebSocket close code etherd sends when the connection's token expired. */
export const CLOSE_TOKEN_EXPIRED = 4001;
/** Close code this client uses when it gives up on a silent connection. */
export const CLOSE_NO_PONG = 4000;

const NORMAL = 1000;
const MAX_TIMER_MS = 2 ** 31 - 1;
// A WebSocket that fails this many times without ever opening means "use SSE" (auto mode).
const WS_FAILURES_BEFORE_SSE = 2;

/**
 * @typedef {object} RealtimeOptions
 * @property {string} [baseUrl] HTTP origin of the etherd server, e.g. `https://ether.example`
 *   (default: the page's origin). WebSocket and SSE URLs are derived from it.
 * @property {() => (string | null | Promise<string | null>)} token Returns the token to use;
 *   called before every connection and every refresh. Return null when there is none: the
 *   client then waits in state `unauthorized` until `reconnect()`.
 * @property {"auto" | "websocket" | "sse"} [transport] `auto` (default) follows
 *   `preferWebSocket` and falls back to SSE when a WebSocket never opens.
 * @property {boolean} [preferWebSocket] The server's `prefer_websocket`; fetched from
 *   `GET /api/realtime/config` when left out in `auto` mode.
 * @property {string[]} [eventNames] Extra event names to listen for over SSE.
 * @property {number} [initialDelayMs] First reconnect delay (default 250); it doubles per
 *   failed attempt up to `maxDelayMs` (default 15000), and each delay is jittered to between
 *   half and all of it, so many clients do not come back at the same instant.
 * @property {number} [maxDelayMs]
 * @property {number} [pingIntervalMs] Application ping over the WebSocket (default 25000);
 *   no pong within `pingTimeoutMs` (default 10000) closes and reconnects. 0 turns it off.
 * @property {number} [pingTimeoutMs]
 * @property {number} [refreshMarginS] Renew the token this long before its `exp` (default 60).
 * @property {typeof WebSocket} [WebSocket] Injected for tests and Node.
 * @property {typeof EventSource} [EventSource]
 * @property {typeof fetch} [fetch]
 * @property {(fn: () => void, ms: number) => any} [setTimeout]
 * @property {(handle: any) => void} [clearTimeout]
 * @property {() => number} [random] In [0, 1); jitter source.
 * @property {() => number} [now] Milliseconds since the epoch.
 */

/**
 * An event as etherd sends it: the envelope (`type`, `event`, `topic`, `offset`, `ts`) and
 * the event's own fields, flat.
 * @typedef {{type: string, event: string, topic: string, offset?: number, ts: string,
 *   [field: string]: any}} EtherEvent
 */

/**
 * What `state` listeners receive.
 * @typedef {object} StateChange
 * @property {"idle"|"connecting"|"open"|"reconnecting"|"unauthorized"|"closed"} state
 * @property {"websocket"|"sse"|null} transport
 * @property {number} attempt Failed attempts since the last healthy connection.
 * @property {number} [delayMs] Wait before the next attempt (`reconnecting`).
 * @property {number} [code] WebSocket close code that caused it, when there was one.
 * @property {string} [reason]
 */

/** Follows topics of one etherd server; see the module documentation. */
export class RealtimeClient {
  /** @param {RealtimeOptions} options */
  constructor(options) {
    if (!options || typeof options.token !== "function") {
      throw new TypeError("RealtimeClient needs options.token, a function returning the token");
    }
    const g = globalThis;
    this.options = {
      baseUrl: options.baseUrl ?? g.location?.origin ?? "",
      transport: options.transport ?? "auto",
      preferWebSocket: options.preferWebSocket,
      eventNames: [...EVENT_NAMES, ...(options.eventNames ?? [])],
      initialDelayMs: options.initialDelayMs ?? 250,
      maxDelayMs: options.maxDelayMs ?? 15000,
      pingIntervalMs: options.pingIntervalMs ?? 25000,
      pingTimeoutMs: options.pingTimeoutMs ?? 10000,
      refreshMarginS: options.refreshMarginS ?? 60,
    };
    this._tokenSource = options.token;
    this._WebSocket = options.WebSocket ?? g.WebSocket;
    this._EventSource = options.EventSource ?? g.EventSource;
    this._fetch = options.fetch ?? (g.fetch ? g.fetch.bind(g) : undefined);
    this._setTimeout = options.setTimeout ?? ((fn, ms) => g.setTimeout(fn, ms));
    this._clearTimeout = options.clearTimeout ?? ((h) => g.clearTimeout(h));
    this._random = options.random ?? Math.random;
    this._now = options.now ?? Date.now;

    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /**
     * topic -> where the caller stands. `position` is the newest offset handed over (or
     * known to be covered); null while unknown (a live-only subscription before its ack).
     * `live`: the pending subscribe asked for live events only. `acked`: its reply came.
     * `expect`: the offset the replay runs to. `ready`: the replay was delivered. `seen`: a
     * stream was open once.
     * @type {Map<string, {position: number|null, live: boolean, acked: boolean,
     *   expect: number|null, ready: boolean, seen: boolean}>}
     */
    this._topics = new Map();
    this._epoch = null;
    this._state = "idle";
    this._transport = null;
    this._attempt = 0;
    this._wsFailures = 0;
    this._wsEverOpened = false;
    this._ids = 0;
    this._token = null;
    this._refreshSupported = null;
    this._pendingRefresh = null;
    this._generation = 0;
    this._ws = null;
    /** @type {Map<string, any>} topic -> EventSource */
    this._sources = new Map();
    // True while connected over SSE: a new topic gets its stream at once.
    this._sseLive = false;
    this._timers = { retry: null, ping: null, pong: null, refresh: null };
    /** Events dropped because they were at or below a topic's position (for diagnostics). */
    this.duplicatesDropped = 0;
  }

  // -- public API -------------------------------------------------------------------------

  /**
   * Listen to `event` (an EtherEvent), `state` (a StateChange), `reset` ({topic, offset,
   * epoch}: reload this topic over HTTP), `ready` ({topic, offset, recovered}: the replay
   * asked for is delivered), `error` ({topic?, code, message}) or `token` ({exp}: the
   * connection now runs on a renewed token).
   * @param {"event"|"state"|"reset"|"ready"|"error"|"token"} name
   * @param {(detail: any) => void} fn
   * @returns {() => void} stops listening
   */
  on(name, fn) {
    let set = this._listeners.get(name);
    if (!set) this._listeners.set(name, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /** The current state (see StateChange). */
  get state() {
    return this._state;
  }

  /** The transport in use, or null before the first connection. */
  get transport() {
    return this._transport;
  }

  /**
   * Follow a topic. With `since`, every retained event after that offset is replayed first
   * (`since: 0` replays everything retained, as on page load); without it, only events from
   * now on arrive. Connects on first use. Subscribing to a followed topic does nothing.
   * @param {string} topic
   * @param {{since?: number}} [opts]
   */
  subscribe(topic, opts = {}) {
    if (this._topics.has(topic)) return;
    const since = opts.since;
    if (since !== undefined && !(Number.isInteger(since) && since >= 0)) {
      throw new RangeError(`since must be an offset (a non-negative integer), got ${since}`);
    }
    this._topics.set(topic, {
      position: since ?? null,
      live: since === undefined,
      acked: false,
      expect: null,
      ready: false,
      seen: false,
    });
    if (this._state === "idle" || this._state === "closed") {
      this.connect();
    } else if (this._transport === "websocket" && this._wsOpen()) {
      this._sendSubscribe([topic]);
    } else if (this._transport === "sse" && this._sseLive) {
      // The other streams are up (or the browser is reconnecting them): add this one now.
      this._openSource(topic, this._token);
    }
  }

  /** Stop following a topic. @param {string} topic */
  unsubscribe(topic) {
    if (!this._topics.delete(topic)) return;
    if (this._transport === "websocket" && this._wsOpen()) {
      this._send({ action: "unsubscribe", topics: [topic], id: this._nextId("u") });
    }
    const source = this._sources.get(topic);
    if (source) {
      source.close();
      this._sources.delete(topic);
    }
  }

  /** The newest offset handed over for a topic, or null. @param {string} topic */
  position(topic) {
    return this._topics.get(topic)?.position ?? null;
  }

  /** Topics being followed. @returns {string[]} */
  topics() {
    return [...this._topics.keys()];
  }

  /** Open the connection (subscribe() does this by itself). */
  connect() {
    if (this._state !== "idle" && this._state !== "closed" && this._state !== "unauthorized") {
      return;
    }
    this._generation += 1;
    this._connect(this._generation);
  }

  /**
   * Drop the connection and connect again at once, e.g. after the user gave a new token.
   * Followed topics resume from their positions.
   */
  reconnect() {
    this._teardown(NORMAL, "reconnecting");
    this._attempt = 0;
    this._generation += 1;
    this._connect(this._generation);
  }

  /**
   * Ask the token source for a token and, when it is a new one, put it in force: with the
   * WebSocket `refresh` action when the server supports it, otherwise by reconnecting
   * (resuming every topic). Called by itself shortly before the token expires.
   * @returns {Promise<boolean>} whether a new token was put in force (or is being)
   */
  async refreshToken() {
    const token = await this._readToken();
    if (!token || token === this._token || this._state === "closed") return false;
    if (this._transport === "websocket" && this._wsOpen() && this._refreshSupported !== false) {
      const id = this._nextId("r");
      this._pendingRefresh = { id, token };
      this._send({ action: "refresh", token, id });
      return true;
    }
    this.reconnect();
    return true;
  }

  /**
   * Close the connection and stop reconnecting. Followed topics and their positions are
   * kept: connect() resumes them.
   */
  close() {
    this._generation += 1;
    this._teardown(NORMAL, "closed by the client");
    this._setState("closed");
  }

  // -- connection ------------------------------------------------------------------------

  async _connect(generation) {
    this._setState(this._attempt > 0 ? "reconnecting" : "connecting");
    const token = await this._readToken();
    if (generation !== this._generation) return;
    if (!token) {
      this._setState("unauthorized");
      return;
    }
    this._token = token;
    const transport = await this._chooseTransport();
    if (generation !== this._generation) return;
    this._transport = transport;
    if (transport === "sse") {
      this._sseLive = true;
      for (const topic of this._topics.keys()) this._openSource(topic, token);
      if (this._topics.size === 0) this._setState("open");
    } else {
      this._openSocket(token, generation);
    }
    this._scheduleRefresh(tokenExpiry(token));
  }

  async _readToken() {
    try {
      const raw = await this._tokenSource();
      const token = typeof raw === "string" ? raw.trim() : "";
      if (!token) return null;
      // An expired token would only be refused: treat it as none.
      const exp = tokenExpiry(token);
      return exp !== null && exp * 1000 <= this._now() ? null : token;
    } catch (err) {
      this._emit("error", { code: "token", message: `the token source failed: ${err}` });
      return null;
    }
  }

  async _chooseTransport() {
    const { transport } = this.options;
    if (transport === "websocket" || transport === "sse") return transport;
    if (!this._WebSocket) return "sse";
    if (this._wsFailures >= WS_FAILURES_BEFORE_SSE && !this._wsEverOpened) return "sse";
    if (this.options.preferWebSocket === undefined && this._fetch) {
      try {
        const resp = await this._fetch(`${this.options.baseUrl}/api/realtime/config`);
        if (resp.ok) this.options.preferWebSocket = (await resp.json()).prefer_websocket !== false;
      } catch {
        // Unreachable server: try the WebSocket, the backoff handles the rest.
      }
    }
    return this.options.preferWebSocket === false ? "sse" : "websocket";
  }

  _teardown(code, reason) {
    for (const key of Object.keys(this._timers)) {
      if (this._timers[key] !== null) this._clearTimeout(this._timers[key]);
      this._timers[key] = null;
    }
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        // Already closed.
      }
    }
    for (const source of this._sources.values()) source.close();
    this._sources.clear();
    this._sseLive = false;
    this._pendingRefresh = null;
  }

  _retry(code, reason) {
    const generation = this._generation;
    this._teardown(NORMAL, "retrying");
    const base = Math.min(this.options.maxDelayMs, this.options.initialDelayMs * 2 ** this._attempt);
    // A token that expired needs a new token, not a pause.
    const delayMs = code === CLOSE_TOKEN_EXPIRED ? 0 : Math.round(base / 2 + (this._random() * base) / 2);
    this._attempt += 1;
    this._setState("reconnecting", { delayMs, code, reason });
    this._timers.retry = this._setTimeout(() => {
      this._timers.retry = null;
      if (generation === this._generation) this._connect(generation);
    }, delayMs);
  }

  _setState(state, extra = {}) {
    this._state = state;
    this._emit("state", { state, transport: this._transport, attempt: this._attempt, ...extra });
  }

  _emit(name, detail) {
    for (const fn of [...(this._listeners.get(name) ?? [])]) {
      try {
        fn(detail);
      } catch (err) {
        // A listener's bug must not break delivery to the others.
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }

  _nextId(prefix) {
    this._ids += 1;
    return `${prefix}${this._ids}`;
  }

  _scheduleRefresh(exp) {
    if (this._timers.refresh !== null) this._clearTimeout(this._timers.refresh);
    this._timers.refresh = null;
    if (exp === null) return;
    const ms = exp * 1000 - this.options.refreshMarginS * 1000 - this._now();
    this._timers.refresh = this._setTimeout(
      () => {
        this._timers.refresh = null;
        this.refreshToken();
      },
      Math.min(Math.max(ms, 0), MAX_TIMER_MS),
    );
  }

  // -- WebSocket -------------------------------------------------------------------------

  _wsOpen() {
    return this._ws !== null && this._ws.readyState === 1;
  }

  _send(message) {
    this._ws.send(JSON.stringify(message));
  }

  _openSocket(token, generation) {
    const url = `${this.options.baseUrl.replace(/^http/, "ws")}/api/realtime?token=${encodeURIComponent(token)}`;
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (err) {
      this._wsFailures += 1;
      this._retry(undefined, String(err));
      return;
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this._wsEverOpened = true;
      this._wsFailures = 0;
      this._setState("open");
      if (this._topics.size) {
        this._sendSubscribe([...this._topics.keys()]);
      } else {
        // Nothing to subscribe, so no ack will say the connection is healthy.
        this._attempt = 0;
      }
      this._schedulePing();
    };
    ws.onmessage = (message) => this._onSocketMessage(message.data);
    ws.onerror = () => {};
    ws.onclose = (event) => {
      if (generation !== this._generation || this._ws !== ws) return;
      this._ws = null;
      if (!opened) this._wsFailures += 1;
      this._retry(event.code, event.reason);
    };
  }

  _sendSubscribe(topics) {
    const since = {};
    for (const topic of topics) {
      const entry = this._topics.get(topic);
      entry.ready = false;
      entry.acked = false;
      entry.expect = null;
      entry.live = entry.position === null;
      if (!entry.live) since[topic] = entry.position;
    }
    const command = { action: "subscribe", topics, id: this._nextId("s") };
    if (Object.keys(since).length) {
      command.since = since;
      if (this._epoch) command.epoch = this._epoch;
    }
    this._send(command);
  }

  _schedulePing() {
    const { pingIntervalMs, pingTimeoutMs } = this.options;
    if (!pingIntervalMs) return;
    this._timers.ping = this._setTimeout(() => {
      this._timers.ping = null;
      if (!this._wsOpen()) return;
      this._send({ action: "ping", id: this._nextId("p") });
      this._timers.pong = this._setTimeout(() => {
        this._timers.pong = null;
        this._retry(CLOSE_NO_PONG, `no pong within ${pingTimeoutMs} ms`);
      }, pingTimeoutMs);
    }, pingIntervalMs);
  }

  _onSocketMessage(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (typeof message !== "object" || message === null) return;
    if (typeof message.topic === "string" && "ts" in message && "event" in message) {
      this._deliver(message);
      return;
    }
    switch (message.type) {
      case "subscribed":
        this._onSubscribed(message);
        break;
      case "pong":
        if (this._timers.pong !== null) this._clearTimeout(this._timers.pong);
        this._timers.pong = null;
        this._schedulePing();
        break;
      case "refreshed":
        this._onRefreshed(message);
        break;
      case "error":
        this._onErrorReply(message);
        break;
      default:
        break;
    }
  }

  _onSubscribed(reply) {
    for (const ack of reply.topics ?? []) {
      const entry = this._topics.get(ack.topic);
      if (!entry) continue;
      entry.acked = true;
      this._epoch = ack.epoch;
      if (entry.live) {
        // Live only: what came before the ack's offset is what an HTTP read shows. (Live
        // events can arrive just before the ack; they are at or below its offset.)
        entry.live = false;
        entry.position = Math.max(entry.position ?? 0, ack.offset);
        this._markReady(ack.topic, entry, true);
      } else if (!ack.recovered) {
        // Nothing is replayed: the caller reloads over HTTP; live events follow the head.
        entry.position = ack.offset;
        this._emit("reset", { topic: ack.topic, offset: ack.offset, epoch: ack.epoch });
        this._markReady(ack.topic, entry, false);
      } else {
        entry.expect = ack.offset;
        if (entry.position >= ack.offset) this._markReady(ack.topic, entry, true);
      }
    }
    for (const refusal of reply.errors ?? []) {
      this._topics.delete(refusal.topic);
      this._emit("error", { topic: refusal.topic, code: refusal.code, message: refusal.message });
    }
    // A connection that answers a subscribe is healthy: the next drop starts backoff anew.
    this._attempt = 0;
  }

  _markReady(topic, entry, recovered) {
    if (entry.ready) return;
    entry.ready = true;
    this._emit("ready", { topic, offset: entry.position, recovered });
  }

  _onRefreshed(reply) {
    const pending = this._pendingRefresh;
    if (!pending || reply.id !== pending.id) return;
    this._pendingRefresh = null;
    this._refreshSupported = true;
    this._token = pending.token;
    const exp = typeof reply.exp === "number" ? reply.exp : tokenExpiry(pending.token);
    this._scheduleRefresh(exp);
    this._emit("token", { exp });
  }

  _onErrorReply(reply) {
    const pending = this._pendingRefresh;
    if (pending && reply.id === pending.id) {
      this._pendingRefresh = null;
      if (reply.code === "bad_request") {
        // The server does not know the refresh action: reconnect with the new token.
        this._refreshSupported = false;
        this.reconnect();
      } else if (reply.code === "forbidden") {
        // A good token for another subject or role: that takes a new connection.
        this.reconnect();
      } else {
        // Refused token: the old one stays in force until it expires (then 4001).
        this._emit("error", { code: reply.code, message: reply.message, action: "refresh" });
      }
      return;
    }
    this._emit("error", { code: reply.code, message: reply.message });
  }

  _deliver(ev) {
    const entry = this._topics.get(ev.topic);
    if (!entry) return;
    // The server holds a resumed topic's live events until its ack and replay, so an event
    // before the ack belongs to an earlier subscription of the topic (unsubscribed and
    // subscribed again): the replay brings it, in order.
    if (!entry.acked && !entry.live) return;
    if (typeof ev.offset === "number") {
      if (entry.position !== null && ev.offset <= entry.position) {
        this.duplicatesDropped += 1;
        return;
      }
      entry.position = ev.offset;
    }
    this._emit("event", ev);
    if (!entry.ready && entry.expect !== null && entry.position >= entry.expect) {
      this._markReady(ev.topic, entry, true);
    }
  }

  // -- Server-Sent Events ----------------------------------------------------------------

  _openSource(topic, token) {
    const entry = this._topics.get(topic);
    let url = `${this.options.baseUrl}/api/events?topic=${encodeURIComponent(topic)}&token=${encodeURIComponent(token)}`;
    if (entry.position !== null) url += `&since=${entry.position}`;
    this._sources.get(topic)?.close();
    // One stream per topic, so nothing of an earlier subscription can arrive on it.
    entry.acked = true;
    const source = new this._EventSource(url);
    this._sources.set(topic, source);
    source.onopen = () => {
      if (this._sources.get(topic) !== source) return;
      // No ack on SSE: a live-only subscription that saw no event yet cannot tell what it
      // missed while it was away, so the caller reloads.
      if (entry.seen && entry.position === null) {
        this._emit("reset", { topic, offset: null, epoch: null });
      }
      entry.seen = true;
      this._attempt = 0;
      this._markReady(topic, entry, true);
      if ([...this._sources.values()].every((s) => s.readyState === 1)) this._setState("open");
    };
    source.onerror = () => {
      if (this._sources.get(topic) !== source) return;
      if (source.readyState === 2) {
        // The browser gave up (an HTTP error such as 401): start over with backoff.
        this._retry(undefined, `the event stream of ${topic} was refused`);
      } else {
        // The browser reconnects by itself and resumes with Last-Event-ID.
        this._setState("reconnecting", { delayMs: null });
      }
    };
    const onEvent = (message) => {
      if (this._sources.get(topic) !== source || typeof message.data !== "string") return;
      try {
        this._deliver(JSON.parse(message.data));
      } catch {
        // Not JSON: not an etherd event.
      }
    };
    for (const name of new Set(["message", ...this.options.eventNames])) {
      if (name !== "reset") source.addEventListener(name, onEvent);
    }
    source.addEventListener("reset", (message) => {
      if (this._sources.get(topic) !== source) return;
      let info = {};
      try {
        info = JSON.parse(message.data);
      } catch {
        // Keep the defaults.
      }
      entry.position = typeof info.offset === "number" ? info.offset : entry.position;
      this._emit("reset", { topic, offset: entry.position, epoch: info.epoch ?? null });
      this._markReady(topic, entry, false);
    });
  }
}

/**
 * The `exp` claim (unix seconds) of a JWT, or null when the token is not a JWT or has none.
 * The token is not verified: the server does that; this only schedules the refresh.
 * @param {string} token
 * @returns {number | null}
 */
export function tokenExpiry(token) {
  const claims = tokenClaims(token);
  return typeof claims?.exp === "number" ? claims.exp : null;
}

/**
 * The claims of a JWT without verifying it, or null for anything else (the development
 * token, say). For display and scheduling only.
 * @param {string} token
 * @returns {Record<string, any> | null}
 */
export function tokenClaims(token) {
  const parts = String(token).split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const claims = JSON.parse(decodeURIComponent(escapeBytes(json)));
    return typeof claims === "object" && claims !== null ? claims : null;
  } catch {
    return null;
  }
}

// atob gives one character per byte; percent-encode them so decodeURIComponent reads UTF-8.
function escapeBytes(binary) {
  let out = "";
  for (let i = 0; i < binary.length; i += 1) {
    out += `%${binary.charCodeAt(i).toString(16).padStart(2, "0")}`;
  }
  return out;
}
