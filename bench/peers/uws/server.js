'use strict';
/*
 * A uWebSockets.js server that speaks the part of etherd's protocol the fan-out
 * benchmarks use, so both can be measured with one load generator:
 *
 *   WS   /api/realtime  {"action":"subscribe","topics":[...],"id":...} -> {"type":"subscribed",...}
 *                       (also unsubscribe, ping, and publish -> {"type":"published",...}),
 *                       topics joined with uWS pub/sub;
 *   POST /api/publish   {"topic","event","data",["durable"]} -> app.publish(topic, event JSON);
 *   GET  /healthz.
 *
 * The event a subscriber receives has etherd's bytes: {"type":E,"event":E,"topic":T,
 * ["offset":n,]"ts":"<RFC 3339 ms>",<data fields>}. As in etherd, a non-durable event has
 * no offset; durable ones take the next value of a per-topic counter. This peer stores
 * nothing and checks no token: it is a yardstick for etherd's fan-out, not a hub.
 *
 *   node server.js --host 127.0.0.1 --port 9001
 */
const uWS = require('uwebsockets');

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at > 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const host = option('--host', '127.0.0.1');
const port = Number(option('--port', '9001'));
const epoch = Date.now().toString(16);
const offsets = new Map(); // topic -> last offset given out
const decoder = new TextDecoder();

function errorBody(code, message) {
  return JSON.stringify({ error: { code, message } });
}

function reply(ws, object) {
  ws.send(JSON.stringify(object), false);
}

// Build the event JSON the way etherd does: the envelope, then the data's own fields.
function eventJson(topic, event, offset, data) {
  let head = `{"type":${JSON.stringify(event)},"event":${JSON.stringify(event)},` +
    `"topic":${JSON.stringify(topic)},`;
  if (offset !== null) head += `"offset":${offset},`;
  head += `"ts":"${new Date().toISOString()}"`;
  const fields = data === undefined || data === null ? '{}' : JSON.stringify(data);
  return fields === '{}' ? head + '}' : head + ',' + fields.slice(1);
}

// Give a publish its offset (durable events only, as etherd) and send it to the topic.
function publish(topic, event, data, durable) {
  let offset = null;
  if (durable !== false) {
    offset = (offsets.get(topic) || 0) + 1;
    offsets.set(topic, offset);
  }
  app.publish(topic, eventJson(topic, event, offset, data), false);
  return offset;
}

function onCommand(ws, text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch (e) {
    reply(ws, { type: 'error', code: 'bad_request', message: `not JSON: ${e.message}` });
    return;
  }
  const id = msg && msg.id !== undefined ? msg.id : undefined;
  const topics = msg && Array.isArray(msg.topics) ? msg.topics.filter((t) => typeof t === 'string') : [];
  switch (msg && msg.action) {
    case 'subscribe':
      for (const topic of topics) ws.subscribe(topic);
      reply(ws, {
        type: 'subscribed',
        id,
        topics: topics.map((topic) => ({
          topic, offset: offsets.get(topic) || 0, epoch, recovered: true,
        })),
        errors: [],
      });
      break;
    case 'unsubscribe':
      for (const topic of topics) ws.unsubscribe(topic);
      reply(ws, { type: 'unsubscribed', id, topics });
      break;
    case 'ping':
      reply(ws, { type: 'pong', id });
      break;
    case 'publish': {
      if (typeof msg.topic !== 'string' || typeof msg.event !== 'string') {
        reply(ws, { type: 'error', id, code: 'invalid', message: 'topic and event are strings' });
        break;
      }
      const offset = publish(msg.topic, msg.event, msg.data, msg.durable);
      reply(ws, offset === null ? { type: 'published', id, topic: msg.topic }
        : { type: 'published', id, topic: msg.topic, offset });
      break;
    }
    default:
      reply(ws, { type: 'error', id, code: 'bad_request', message: 'unknown action' });
  }
}

function answer(res, status, body) {
  res.cork(() => {
    res.writeStatus(status).writeHeader('Content-Type', 'application/json').end(body);
  });
}

function onPublish(res, raw) {
  let body;
  try {
    body = JSON.parse(raw);
  } catch (e) {
    answer(res, '400 Bad Request', errorBody('bad_request', `not JSON: ${e.message}`));
    return;
  }
  const { topic, event, data } = body || {};
  if (typeof topic !== 'string' || typeof event !== 'string') {
    answer(res, '422 Unprocessable Entity', errorBody('invalid', 'topic and event are strings'));
    return;
  }
  const offset = publish(topic, event, data, body.durable);
  const item = offset === null ? { topic, event } : { topic, event, offset };
  answer(res, '200 OK', JSON.stringify({ published: [item], epoch }));
}

const app = uWS.App();

app.ws('/api/realtime', {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024,
  // The same cap as the driver gives etherd (ws.max_pending_bytes): beyond it, close.
  maxBackpressure: 256 * 1024 * 1024,
  closeOnBackpressureLimit: true,
  idleTimeout: 0,
  sendPingsAutomatically: false,
  message: (ws, message, isBinary) => {
    if (isBinary) {
      ws.end(1003, 'text frames only');
      return;
    }
    onCommand(ws, decoder.decode(message));
  },
});

app.post('/api/publish', (res) => {
  const parts = [];
  let aborted = false;
  res.onAborted(() => {
    aborted = true;
  });
  res.onData((chunk, isLast) => {
    // The chunk's memory is reused once this callback returns: copy it.
    parts.push(Buffer.from(new Uint8Array(chunk)));
    if (isLast && !aborted) onPublish(res, Buffer.concat(parts).toString('utf8'));
  });
});

app.get('/healthz', (res) => answer(res, '200 OK', '{"status":"ok"}'));

app.any('/*', (res) => answer(res, '404 Not Found', errorBody('not_found', 'no such route')));

let listenSocket = null;
app.listen(host, port, (socket) => {
  if (!socket) {
    console.error(`uws peer: cannot listen on ${host}:${port}`);
    process.exit(1);
  }
  listenSocket = socket;
  console.log(`uws peer listening on http://${host}:${port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    if (listenSocket) uWS.us_listen_socket_close(listenSocket);
    process.exit(0);
  });
}
