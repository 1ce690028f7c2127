// The realtime client's resume, fallback and token logic, against fake sockets and a fake
// clock (node --test; run by tests/web/test_client_js.py as part of `make test`).

import assert from "node:assert/strict";
import { beforeEach, describe, test } from "node:test";

import {
  CLOSE_TOKEN_EXPIRED,
  RealtimeClient,
  tokenClaims,
  tokenExpiry,
} from "../../etherd/web/client.js";
import {
  FakeClock,
  FakeEventSource,
  FakeSocket,
  configFetch,
  event,
  flush,
  jwt,
} from "./fakes.mjs";

const TOPIC = "tasks/task_1";
const BASE = "http://127.0.0.1:8080";

/** A client on fakes, with every emitted thing recorded. */
function makeClient(overrides = {}) {
  const clock = overrides.clock ?? new FakeClock();
  let token = overrides.token ?? "test";
  const client = new RealtimeClient({
    baseUrl: BASE,
    token: () => token,
    preferWebSocket: true,
    WebSocket: FakeSocket,
    EventSource: FakeEventSource,
    fetch: configFetch(true),
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: () => clock.now,
    random: () => 0.5,
    pingIntervalMs: 0,
    ...overrides.options,
  });
  const seen = { events: [], states: [], resets: [], ready: [], errors: [], tokens: [] };
  client.on("event", (ev) => seen.events.push(ev));
  client.on("state", (s) => seen.states.push(s));
  client.on("reset", (r) => seen.resets.push(r));
  client.on("ready", (r) => seen.ready.push(r));
  client.on("error", (e) => seen.errors.push(e));
  client.on("token", (t) => seen.tokens.push(t));
  return { client, clock, seen, setToken: (t) => (token = t) };
}

function ack(topic, offset, { recovered = true, epoch = "ep1", id = "s1" } = {}) {
  return { type: "subscribed", id, topics: [{ topic, offset, epoch, recovered }], errors: [] };
}

/** Connect and open the first socket; returns it. */
async function connected(client) {
  await flush();
  const ws = FakeSocket.last();
  ws.open();
  return ws;
}

beforeEach(() => {
  FakeSocket.reset();
  FakeEventSource.reset();
});

describe("subscribe and resume over WebSocket", () => {
  test("page load replays from since 0, reports ready, then goes live", async () => {
    const { client, seen } = makeClient();
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    assert.equal(ws.url, "ws://127.0.0.1:8080/api/realtime?token=test");
    const [sub] = ws.commands("subscribe");
    assert.deepEqual(sub.topics, [TOPIC]);
    assert.deepEqual(sub.since, { [TOPIC]: 0 });
    assert.equal(sub.epoch, undefined, "no epoch before the first ack");
    ws.receive(ack(TOPIC, 2, { id: sub.id }));
    assert.deepEqual(seen.ready, [], "ready waits for the replay");
    ws.receive(event(TOPIC, 1));
    ws.receive(event(TOPIC, 2));
    assert.deepEqual(seen.ready, [{ topic: TOPIC, offset: 2, recovered: true }]);
    ws.receive(event(TOPIC, 3));
    assert.deepEqual(
      seen.events.map((e) => e.offset),
      [1, 2, 3],
    );
    assert.equal(client.position(TOPIC), 3);
    assert.equal(client.state, "open");
  });

  test("a dropped connection resumes after the newest offset with the epoch, no duplicate", async () => {
    const { client, clock, seen } = makeClient();
    client.subscribe(TOPIC, { since: 0 });
    const first = await connected(client);
    first.receive(ack(TOPIC, 2, { epoch: "ep9" }));
    first.receive(event(TOPIC, 1));
    first.receive(event(TOPIC, 2));
    first.drop(1012, "restart");
    assert.equal(client.state, "reconnecting");
    assert.equal(seen.states.at(-1).code, 1012);
    await clock.advance(seen.states.at(-1).delayMs);
    const second = FakeSocket.last();
    assert.notEqual(second, first);
    second.open();
    const [sub] = second.commands("subscribe");
    assert.deepEqual(sub.since, { [TOPIC]: 2 });
    assert.equal(sub.epoch, "ep9");
    second.receive(ack(TOPIC, 4, { epoch: "ep9", id: sub.id }));
    // A server bug or a replay overlapping live delivery must not show an event twice.
    second.receive(event(TOPIC, 2));
    second.receive(event(TOPIC, 3));
    second.receive(event(TOPIC, 4));
    assert.deepEqual(
      seen.events.map((e) => e.offset),
      [1, 2, 3, 4],
    );
    assert.equal(client.duplicatesDropped, 1);
    assert.equal(seen.ready.length, 2, "ready again once the resume's replay is in");
  });

  test("a live-only subscription resumes from the offset its ack named", async () => {
    const { client, clock, seen } = makeClient();
    client.subscribe("activity/alice");
    const first = await connected(client);
    const [sub] = first.commands("subscribe");
    assert.equal(sub.since, undefined, "live only asks for no replay");
    // A live event can arrive just before the ack; it is at or below the ack's offset.
    first.receive(event("activity/alice", 7, "activity.list_updated"));
    first.receive(ack("activity/alice", 7));
    assert.equal(client.position("activity/alice"), 7);
    assert.deepEqual(seen.ready, [{ topic: "activity/alice", offset: 7, recovered: true }]);
    first.drop();
    await clock.advance(seen.states.at(-1).delayMs);
    const second = FakeSocket.last();
    second.open();
    assert.deepEqual(second.commands("subscribe")[0].since, { "activity/alice": 7 });
  });

  test("recovered: false asks the caller to reload and continues after the named offset", async () => {
    const { client, seen } = makeClient();
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 40, { recovered: false, epoch: "ep2" }));
    assert.deepEqual(seen.resets, [{ topic: TOPIC, offset: 40, epoch: "ep2" }]);
    assert.deepEqual(seen.ready, [{ topic: TOPIC, offset: 40, recovered: false }]);
    ws.receive(event(TOPIC, 40));
    ws.receive(event(TOPIC, 41));
    assert.deepEqual(
      seen.events.map((e) => e.offset),
      [41],
    );
  });

  test("several topics go in one subscribe; a later one in its own", async () => {
    const { client } = makeClient();
    client.subscribe("tasks/a", { since: 3 });
    client.subscribe("tasks/b");
    const ws = await connected(client);
    const [first] = ws.commands("subscribe");
    assert.deepEqual(first.topics, ["tasks/a", "tasks/b"]);
    assert.deepEqual(first.since, { "tasks/a": 3 });
    client.subscribe("tasks/c", { since: 0 });
    const later = ws.commands("subscribe")[1];
    assert.deepEqual(later.topics, ["tasks/c"]);
    assert.deepEqual(later.since, { "tasks/c": 0 });
    client.subscribe("tasks/c", { since: 0 });
    assert.equal(ws.commands("subscribe").length, 2, "subscribing twice does nothing");
  });

  test("a refused topic is reported and not asked for again", async () => {
    const { client, clock, seen } = makeClient();
    client.subscribe("tasks/mine", { since: 0 });
    client.subscribe("tasks/theirs", { since: 0 });
    const ws = await connected(client);
    ws.receive({
      type: "subscribed",
      id: "s1",
      topics: [{ topic: "tasks/mine", offset: 0, epoch: "e", recovered: true }],
      errors: [{ topic: "tasks/theirs", code: "forbidden", message: "not yours" }],
    });
    assert.deepEqual(seen.errors, [{ topic: "tasks/theirs", code: "forbidden", message: "not yours" }]);
    assert.deepEqual(client.topics(), ["tasks/mine"]);
    ws.drop();
    await clock.advance(1000);
    FakeSocket.last().open();
    assert.deepEqual(FakeSocket.last().commands("subscribe")[0].topics, ["tasks/mine"]);
  });

  test("unsubscribe tells the server and drops the topic's later events", async () => {
    const { client, seen } = makeClient();
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 0));
    client.unsubscribe(TOPIC);
    assert.deepEqual(ws.commands("unsubscribe")[0].topics, [TOPIC]);
    ws.receive(event(TOPIC, 1));
    assert.deepEqual(seen.events, []);
    assert.equal(client.position(TOPIC), null);
  });

  test("events of an earlier subscription of a topic do not cut the new one's replay short", async () => {
    const { client, seen } = makeClient();
    client.subscribe(TOPIC);
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 5));
    client.unsubscribe(TOPIC);
    client.subscribe(TOPIC, { since: 0 });
    // Sent before the server read the unsubscribe: it must not move the new position to 6.
    ws.receive(event(TOPIC, 6));
    ws.receive({ type: "unsubscribed", id: "u2", topics: [TOPIC] });
    ws.receive(ack(TOPIC, 6, { id: "s3" }));
    for (let n = 1; n <= 6; n += 1) ws.receive(event(TOPIC, n));
    assert.deepEqual(
      seen.events.map((e) => e.offset),
      [1, 2, 3, 4, 5, 6],
    );
  });

  test("close() stops for good: no reconnect", async () => {
    const { client, clock } = makeClient();
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    client.close();
    assert.equal(ws.closedWith.code, 1000);
    assert.equal(client.state, "closed");
    await clock.advance(60_000);
    assert.equal(FakeSocket.instances.length, 1);
  });
});

describe("backoff", () => {
  test("delays double up to the cap, jittered between half and all, and start over once healthy", async () => {
    const jitter = [0, 0.999, 0.5, 0, 0, 0, 0, 0];
    let i = 0;
    const { client, clock, seen } = makeClient({
      options: {
        transport: "websocket",
        random: () => jitter[i++ % jitter.length],
        initialDelayMs: 100,
        maxDelayMs: 1000,
      },
    });
    client.subscribe(TOPIC, { since: 0 });
    await flush();
    const delays = [];
    for (let attempt = 0; attempt < 6; attempt += 1) {
      FakeSocket.last().drop();
      const { delayMs } = seen.states.at(-1);
      delays.push(delayMs);
      await clock.advance(delayMs);
    }
    // Bases 100, 200, 400, 800, 1000, 1000; jitter picks within [base/2, base].
    assert.deepEqual(delays, [50, 200, 300, 400, 500, 500]);
    for (const [n, base] of [100, 200, 400, 800, 1000, 1000].entries()) {
      assert.ok(delays[n] >= base / 2 && delays[n] <= base, `attempt ${n}: ${delays[n]}`);
    }
    const ws = FakeSocket.last();
    ws.open();
    ws.receive(ack(TOPIC, 0, { id: ws.commands("subscribe")[0].id }));
    ws.drop();
    assert.equal(seen.states.at(-1).delayMs, 50, "a healthy connection resets the backoff");
    assert.equal(seen.states.at(-1).attempt, 1);
  });

  test("an expired token (4001) reconnects at once with the token the source gives now", async () => {
    const { client, clock, seen, setToken } = makeClient({ token: "old" });
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 0));
    setToken("new");
    ws.drop(CLOSE_TOKEN_EXPIRED, "token expired");
    assert.equal(seen.states.at(-1).delayMs, 0);
    await clock.advance(0);
    assert.match(FakeSocket.last().url, /token=new$/);
  });

  test("no token, or an expired one, waits as unauthorized until reconnect()", async () => {
    const clock = new FakeClock();
    const expired = jwt({ sub: "alice", exp: clock.now / 1000 - 5 });
    const { client, seen, setToken } = makeClient({ clock, token: expired });
    client.subscribe(TOPIC, { since: 0 });
    await flush();
    assert.equal(client.state, "unauthorized");
    assert.equal(FakeSocket.instances.length, 0, "an expired token is never sent");
    setToken(jwt({ sub: "alice", exp: clock.now / 1000 + 3600 }));
    client.reconnect();
    await flush();
    assert.equal(FakeSocket.instances.length, 1);
    assert.equal(seen.states.at(-1).state, "connecting");
  });

  test("a silent connection (no pong) is dropped and resumed", async () => {
    const { client, clock, seen } = makeClient({
      options: { pingIntervalMs: 1000, pingTimeoutMs: 500 },
    });
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 0));
    await clock.advance(1000);
    assert.equal(ws.commands("ping").length, 1);
    ws.receive({ type: "pong", id: ws.commands("ping")[0].id });
    await clock.advance(1000);
    assert.equal(ws.commands("ping").length, 2, "a pong schedules the next ping");
    await clock.advance(500);
    assert.equal(ws.closedWith.code, 1000);
    assert.equal(seen.states.at(-1).state, "reconnecting");
    assert.equal(seen.states.at(-1).code, 4000);
  });
});

describe("token refresh", () => {
  test("renews with the refresh action before exp, without reconnecting", async () => {
    const clock = new FakeClock();
    const exp = clock.now / 1000 + 600;
    const { client, seen, setToken } = makeClient({ clock, token: jwt({ sub: "a", exp }) });
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 0));
    const renewed = jwt({ sub: "a", exp: exp + 3600 });
    setToken(renewed);
    // The default margin is 60 s before exp.
    await clock.advance(539_000);
    assert.equal(ws.commands("refresh").length, 0);
    await clock.advance(1_000);
    const [refresh] = ws.commands("refresh");
    assert.equal(refresh.token, renewed);
    ws.receive({ type: "refreshed", id: refresh.id, exp: exp + 3600 });
    assert.deepEqual(seen.tokens, [{ exp: exp + 3600 }]);
    assert.equal(FakeSocket.instances.length, 1);
    assert.equal(ws.closedWith, null);
  });

  test("a server without the refresh action gets a reconnect with the new token and a resume", async () => {
    const { client, setToken } = makeClient({ token: "first" });
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 1));
    ws.receive(event(TOPIC, 1));
    setToken("second");
    assert.equal(await client.refreshToken(), true);
    const [refresh] = ws.commands("refresh");
    ws.receive({ type: "error", id: refresh.id, code: "bad_request", message: "invalid command" });
    await flush();
    const next = FakeSocket.last();
    assert.notEqual(next, ws);
    assert.match(next.url, /token=second$/);
    next.open();
    assert.deepEqual(next.commands("subscribe")[0].since, { [TOPIC]: 1 });
    // Known now: the next refresh reconnects straight away.
    setToken("third");
    await client.refreshToken();
    await flush();
    assert.equal(next.commands("refresh").length, 0);
    assert.match(FakeSocket.last().url, /token=third$/);
  });

  test("a refused new token keeps the connection and reports the refusal", async () => {
    const { client, seen, setToken } = makeClient({ token: "first" });
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    setToken("bad");
    await client.refreshToken();
    const [refresh] = ws.commands("refresh");
    ws.receive({ type: "error", id: refresh.id, code: "unauthorized", message: "bad signature" });
    assert.deepEqual(seen.errors, [{ code: "unauthorized", message: "bad signature", action: "refresh" }]);
    assert.equal(FakeSocket.instances.length, 1);
    assert.equal(ws.closedWith, null);
  });

  test("a token for another subject or role takes a new connection", async () => {
    const { client, setToken } = makeClient({ token: "alice" });
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 0));
    setToken("bob");
    await client.refreshToken();
    const [refresh] = ws.commands("refresh");
    ws.receive({ type: "error", id: refresh.id, code: "forbidden", message: "same subject" });
    await flush();
    assert.match(FakeSocket.last().url, /token=bob$/);
    FakeSocket.last().open();
    assert.deepEqual(FakeSocket.last().commands("subscribe")[0].since, { [TOPIC]: 0 });
  });

  test("the same token again changes nothing", async () => {
    const { client } = makeClient();
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    assert.equal(await client.refreshToken(), false);
    assert.equal(ws.commands("refresh").length, 0);
  });

  test("tokenClaims reads a JWT's claims; anything else is null", () => {
    assert.deepEqual(tokenClaims(jwt({ sub: "zoë", exp: 5 })), { sub: "zoë", exp: 5 });
    assert.equal(tokenExpiry(jwt({ sub: "a" })), null);
    assert.equal(tokenClaims("test"), null);
    assert.equal(tokenClaims("a.!!!.c"), null);
  });
});

describe("Server-Sent Events", () => {
  test("prefer_websocket: false uses one EventSource per topic with the token and since", async () => {
    const fetch = configFetch(false);
    const { client, seen } = makeClient({ options: { preferWebSocket: undefined, fetch } });
    client.subscribe(TOPIC, { since: 4 });
    client.subscribe("activity/alice");
    await flush();
    assert.deepEqual(fetch.calls, [`${BASE}/api/realtime/config`]);
    assert.equal(FakeSocket.instances.length, 0);
    const [task, activity] = FakeEventSource.instances;
    assert.equal(task.params.get("topic"), TOPIC);
    assert.equal(task.params.get("token"), "test");
    assert.equal(task.params.get("since"), "4");
    assert.equal(activity.params.get("since"), null);
    task.open();
    assert.equal(client.state, "connecting", "open once every stream is");
    activity.open();
    assert.equal(client.state, "open");
    assert.equal(client.transport, "sse");
    task.emit("os.harness.step", event(TOPIC, 5), 5);
    task.emit("task.timeline", event(TOPIC, 6, "task.timeline"), 6);
    task.emit("os.harness.step", event(TOPIC, 5), 5);
    assert.deepEqual(
      seen.events.map((e) => [e.offset, e.event]),
      [
        [5, "os.harness.step"],
        [6, "task.timeline"],
      ],
    );
  });

  test("the browser's own reconnect (Last-Event-ID) keeps the stream; a refused one starts over from the position", async () => {
    const { client, clock, seen } = makeClient({ options: { transport: "sse" } });
    client.subscribe(TOPIC, { since: 0 });
    await flush();
    const first = FakeEventSource.instances[0];
    first.open();
    first.emit("os.harness.step", event(TOPIC, 1), 1);
    first.interrupt();
    assert.equal(client.state, "reconnecting");
    assert.equal(FakeEventSource.instances.length, 1, "the browser resumes by itself");
    first.open();
    assert.equal(client.state, "open");
    first.emit("os.harness.step", event(TOPIC, 2), 2);
    first.fail();
    await clock.advance(seen.states.at(-1).delayMs);
    const second = FakeEventSource.instances[1];
    assert.ok(first.closed);
    assert.equal(second.params.get("since"), "2");
    second.open();
    second.emit("os.harness.step", event(TOPIC, 3), 3);
    assert.deepEqual(
      seen.events.map((e) => e.offset),
      [1, 2, 3],
    );
    assert.deepEqual(seen.resets, []);
  });

  test("a topic subscribed after connecting gets its own stream at once", async () => {
    const { client, seen } = makeClient({ options: { transport: "sse" } });
    client.connect();
    await flush();
    assert.equal(client.state, "open", "no topic: nothing to wait for");
    client.subscribe(TOPIC, { since: 0 });
    const [source] = FakeEventSource.instances;
    assert.equal(source.params.get("since"), "0");
    source.open();
    source.emit("os.harness.step", event(TOPIC, 1), 1);
    assert.deepEqual(
      seen.events.map((e) => e.offset),
      [1],
    );
    client.unsubscribe(TOPIC);
    assert.ok(source.closed);
  });

  test("an SSE reset event asks the caller to reload", async () => {
    const { client, seen } = makeClient({ options: { transport: "sse" } });
    client.subscribe(TOPIC, { since: 3 });
    await flush();
    const source = FakeEventSource.instances[0];
    source.open();
    source.emit("reset", { topic: TOPIC, offset: 9, epoch: "ep3" });
    assert.deepEqual(seen.resets, [{ topic: TOPIC, offset: 9, epoch: "ep3" }]);
    source.emit("task.timeline", event(TOPIC, 10, "task.timeline"), 10);
    assert.equal(client.position(TOPIC), 10);
  });

  test("a live-only stream that comes back before any event asks for a reload", async () => {
    const { client, seen } = makeClient({ options: { transport: "sse" } });
    client.subscribe("activity/alice");
    await flush();
    const source = FakeEventSource.instances[0];
    source.open();
    assert.deepEqual(seen.resets, []);
    source.interrupt();
    source.open();
    assert.deepEqual(seen.resets, [{ topic: "activity/alice", offset: null, epoch: null }]);
  });

  test("a WebSocket that never opens falls back to SSE", async () => {
    const { client, clock, seen } = makeClient({ options: { preferWebSocket: undefined } });
    client.subscribe(TOPIC, { since: 0 });
    await flush();
    FakeSocket.last().drop(1006);
    await clock.advance(seen.states.at(-1).delayMs);
    assert.equal(FakeSocket.instances.length, 2);
    FakeSocket.last().drop(1006);
    await clock.advance(seen.states.at(-1).delayMs);
    assert.equal(FakeSocket.instances.length, 2, "no third WebSocket");
    assert.equal(FakeEventSource.instances.length, 1);
    assert.equal(client.transport, "sse");
  });

  test("a WebSocket that opened once keeps being retried instead", async () => {
    const { client, clock, seen } = makeClient({ options: { preferWebSocket: undefined } });
    client.subscribe(TOPIC, { since: 0 });
    const ws = await connected(client);
    ws.receive(ack(TOPIC, 0));
    ws.drop(1006);
    for (let n = 0; n < 3; n += 1) {
      await clock.advance(seen.states.at(-1).delayMs);
      FakeSocket.last().drop(1006);
    }
    assert.equal(FakeEventSource.instances.length, 0);
    assert.equal(FakeSocket.instances.length, 4);
  });
});
