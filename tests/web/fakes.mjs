// Test doubles for the realtime client: a clock whose timers run only when told, a
// WebSocket and an EventSource driven by hand from the test (the "server" side).

export class FakeClock {
  constructor(start = 1_800_000_000_000) {
    this.now = start;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.now + ms, fn, ms });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  /** Delays of the timers now pending, in the order they were set. */
  pending() {
    return [...this.timers.values()].map((t) => t.ms);
  }

  /** Move time on, running every timer that falls due, in time order. */
  async advance(ms) {
    const until = this.now + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) {
        if (t.at <= until && (next === null || t.at < next[1].at)) next = [id, t];
      }
      if (next === null) break;
      this.timers.delete(next[0]);
      this.now = next[1].at;
      next[1].fn();
      await flush();
    }
    this.now = until;
    await flush();
  }
}

/** Let pending promise callbacks (the client's async connect) run. */
export async function flush() {
  for (let i = 0; i < 5; i += 1) await new Promise((resolve) => setImmediate(resolve));
}

export class FakeSocket {
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.instances.push(this);
  }

  static reset() {
    FakeSocket.instances = [];
  }

  static last() {
    return FakeSocket.instances[FakeSocket.instances.length - 1];
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    this.sent.push(JSON.parse(text));
  }

  close(code, reason) {
    this.readyState = 3;
    this.closedWith = { code, reason };
  }

  // -- the server's side --

  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  receive(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }

  drop(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** The commands the client sent with this action. */
  commands(action) {
    return this.sent.filter((m) => m.action === action);
  }
}

export class FakeEventSource {
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.listeners = new Map();
    this.closed = false;
    FakeEventSource.instances.push(this);
  }

  static reset() {
    FakeEventSource.instances = [];
  }

  addEventListener(name, fn) {
    if (!this.listeners.has(name)) this.listeners.set(name, []);
    this.listeners.get(name).push(fn);
  }

  close() {
    this.readyState = 2;
    this.closed = true;
  }

  get params() {
    return new URL(this.url).searchParams;
  }

  // -- the server's side --

  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  emit(name, data, id) {
    for (const fn of this.listeners.get(name) ?? []) {
      fn({ data: JSON.stringify(data), lastEventId: id === undefined ? "" : String(id) });
    }
  }

  /** A dropped stream the browser will reconnect by itself (readyState CONNECTING). */
  interrupt() {
    this.readyState = 0;
    this.onerror?.({});
  }

  /** A stream the browser gave up on (an HTTP error: readyState CLOSED). */
  fail() {
    this.readyState = 2;
    this.onerror?.({});
  }
}

/** An event as etherd sends it. */
export function event(topic, offset, name = "os.harness.step", fields = {}) {
  return { type: name, event: name, topic, offset, ts: "2027-01-15T10:00:00.000Z", ...fields };
}

/** An unsigned JWT with these claims (the client never verifies tokens). */
export function jwt(claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}.c2ln`;
}

/** A fetch that answers GET /api/realtime/config. */
export function configFetch(preferWebSocket) {
  const calls = [];
  const fetch = async (url) => {
    calls.push(url);
    return { ok: true, json: async () => ({ prefer_websocket: preferWebSocket }) };
  };
  fetch.calls = calls;
  return fetch;
}
