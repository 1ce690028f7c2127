// The operator view (admin tokens): the server's own stats, refreshed every few seconds, a
// form to publish a test event, and a live tail of any topic over either transport.

import { RealtimeClient } from "/client.js";
import { api, describeError, session } from "/web/api.js";
import { fullTime, h, relativeTime } from "/web/dom.js";

const REFRESH_MS = 1000;

export class OpsView {
  constructor(root) {
    this.tail = null;
    document.title = "Operator · etherd";
    root.append(
      h(
        "div",
        { class: "page-head" },
        h("h1", {}, "Operator"),
        (this.updated = h("p", { class: "muted", id: "stats-updated" }, "Reading the server's stats…")),
      ),
      (this.error = h("p", { class: "error", role: "alert", id: "stats-error" })),
      this.statsSection(),
      h("div", { class: "ops-grid" }, this.publishSection(), this.tailSection()),
    );
    this.refresh();
    this.timer = setInterval(() => this.refresh(), REFRESH_MS);
  }

  destroy() {
    clearInterval(this.timer);
    this.stopTail();
  }

  // -- stats -----------------------------------------------------------------------------

  statsSection() {
    const value = (id) => h("dd", { id }, "–");
    const tile = (title, rows) =>
      h(
        "section",
        { class: "card tile", "aria-label": title },
        h("h2", {}, title),
        h("dl", { class: "facts" }, rows.flatMap(([label, id]) => [h("dt", {}, label), value(id)])),
      );
    this.topicRows = h("tbody", { id: "topics-body" });
    return h(
      "div",
      { class: "stats" },
      h(
        "div",
        { class: "tiles" },
        tile("Node", [
          ["Name", "stat-node"],
          ["Started", "stat-started"],
        ]),
        tile("Connections", [
          ["WebSocket", "stat-websocket"],
          ["SSE", "stat-sse"],
          ["HTTP", "stat-http"],
          ["Subscriptions", "stat-subscriptions"],
        ]),
        tile("Rates (per second, last 5 s)", [
          ["Published", "rate-published"],
          ["Delivered", "rate-delivered"],
          ["Commits", "rate-commits"],
          ["Stored", "rate-stored"],
        ]),
        tile("Store", [
          ["Status", "store-up"],
          ["Kind", "store-kind"],
          ["Queued rows", "store-queue"],
          ["Epoch", "store-epoch"],
        ]),
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "topics-title" },
        h("h2", { id: "topics-title" }, "Topics by subscribers"),
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { id: "topics-table" },
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Topic"), h("th", { scope: "col", class: "num" }, "Subscribers"))),
            this.topicRows,
          ),
        ),
        (this.noTopics = h("p", { class: "muted", hidden: true }, "Nobody is subscribed to anything.")),
      ),
    );
  }

  async refresh() {
    if (document.hidden) return;
    let stats;
    try {
      stats = await api("GET", "/api/admin/stats");
    } catch (err) {
      this.error.textContent = `Stats unavailable: ${describeError(err)}`;
      return;
    }
    this.error.textContent = "";
    const set = (id, text) => {
      const el = document.getElementById(id);
      if (el) el.textContent = String(text);
    };
    set("stat-node", stats.node);
    set("stat-started", relativeTime(stats.started_at));
    document.getElementById("stat-started").title = fullTime(stats.started_at);
    set("stat-websocket", stats.connections.websocket);
    set("stat-sse", stats.connections.sse);
    set("stat-http", stats.connections.http);
    set("stat-subscriptions", stats.subscriptions);
    set("rate-published", stats.rates.published_per_s);
    set("rate-delivered", stats.rates.delivered_per_s);
    set("rate-commits", stats.rates.commits_per_s);
    set("rate-stored", stats.rates.stored_per_s);
    set("store-up", stats.store.up ? "Up" : "Down");
    document.getElementById("store-up").dataset.up = String(stats.store.up);
    set("store-kind", stats.store.kind === "postgresql" ? "PostgreSQL" : "SQLite");
    set("store-queue", stats.store.queue_rows);
    set("store-epoch", stats.store.epoch);
    this.topicRows.replaceChildren(
      ...stats.topics.map((t) =>
        h(
          "tr",
          { dataset: { topic: t.topic } },
          h("td", {}, h("code", {}, t.topic)),
          h("td", { class: "num" }, String(t.subscribers)),
        ),
      ),
    );
    this.noTopics.hidden = stats.topics.length > 0;
    this.updated.textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every second.`;
  }

  // -- publish ---------------------------------------------------------------------------

  publishSection() {
    const topic = h("input", { id: "pub-topic", type: "text", value: "ops/test", required: true, spellcheck: "false" });
    const name = h("input", { id: "pub-event", type: "text", value: "note", required: true, spellcheck: "false" });
    const data = h("textarea", { id: "pub-data", rows: 4, spellcheck: "false" }, '{"text": "hello from the operator view"}');
    const durable = h("input", { id: "pub-durable", type: "checkbox", checked: true });
    const result = h("p", { class: "notice", id: "pub-result", role: "status" });
    const error = h("p", { class: "error", role: "alert", id: "pub-error" });
    const form = h(
      "form",
      { class: "stack", id: "publish-form", novalidate: true },
      h("div", { class: "field" }, h("label", { for: "pub-topic" }, "Topic"), topic),
      h("div", { class: "field" }, h("label", { for: "pub-event" }, "Event name"), name),
      h("div", { class: "field" }, h("label", { for: "pub-data" }, "Data (a JSON object)"), data),
      h("label", { class: "toggle", for: "pub-durable" }, durable, " Durable (stored, gets an offset)"),
      error,
      h("div", { class: "row" }, h("button", { type: "submit", class: "button primary" }, "Publish")),
      result,
    );
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      error.textContent = "";
      result.textContent = "";
      let fields;
      try {
        fields = data.value.trim() ? JSON.parse(data.value) : {};
      } catch (err) {
        error.textContent = `Data is not JSON: ${err.message}`;
        return;
      }
      if (typeof fields !== "object" || fields === null || Array.isArray(fields)) {
        error.textContent = "Data must be a JSON object, like {\"text\": \"hi\"}.";
        return;
      }
      try {
        const answer = await api("POST", "/api/publish", {
          body: { topic: topic.value.trim(), event: name.value.trim(), data: fields, durable: durable.checked },
        });
        const item = answer.published[0];
        result.textContent =
          item.offset === undefined
            ? `Published ${item.event} on ${item.topic} (not stored).`
            : `Published ${item.event} on ${item.topic} at offset ${item.offset}.`;
      } catch (err) {
        error.textContent = describeError(err);
      }
    });
    return h(
      "section",
      { class: "card", "aria-labelledby": "publish-title" },
      h("h2", { id: "publish-title" }, "Publish a test event"),
      form,
    );
  }

  // -- live tail -------------------------------------------------------------------------

  tailSection() {
    const topic = h("input", { id: "tail-topic", type: "text", value: "ops/test", required: true, spellcheck: "false" });
    const since = h("input", {
      id: "tail-since",
      type: "text",
      inputmode: "numeric",
      placeholder: "live only",
      "aria-describedby": "tail-since-hint",
    });
    const transport = h(
      "select",
      { id: "tail-transport" },
      h("option", { value: "auto" }, "Automatic"),
      h("option", { value: "websocket" }, "WebSocket"),
      h("option", { value: "sse" }, "Server-Sent Events"),
    );
    const names = h("input", {
      id: "tail-names",
      type: "text",
      value: "note, hello",
      spellcheck: "false",
      "aria-describedby": "tail-names-hint",
    });
    const namesField = h(
      "div",
      { class: "field", hidden: true },
      h("label", { for: "tail-names" }, "Extra event names"),
      names,
      h("p", { class: "hint", id: "tail-names-hint" }, "Server-Sent Events deliver only the names listened for; the task events are always included."),
    );
    transport.addEventListener("change", () => (namesField.hidden = transport.value !== "sse"));
    const button = h("button", { type: "submit", class: "button primary", id: "tail-toggle" }, "Start");
    this.tailStatus = h("p", { class: "muted", id: "tail-status", role: "status", dataset: { state: "idle" } }, "Not following a topic.");
    this.tailList = h("ol", { class: "tail", id: "tail-events", dataset: { duplicates: "0" } });
    const error = h("p", { class: "error", role: "alert" });
    const form = h(
      "form",
      { class: "stack", id: "tail-form", novalidate: true },
      h("div", { class: "field" }, h("label", { for: "tail-topic" }, "Topic"), topic),
      h(
        "div",
        { class: "field" },
        h("label", { for: "tail-since" }, "Replay after offset"),
        since,
        h("p", { class: "hint", id: "tail-since-hint" }, "0 replays everything stored; empty follows live events only."),
      ),
      h("div", { class: "field" }, h("label", { for: "tail-transport" }, "Transport"), transport),
      namesField,
      error,
      h("div", { class: "row" }, button),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      error.textContent = "";
      if (this.tail) {
        this.stopTail();
        button.textContent = "Start";
        return;
      }
      const text = since.value.trim();
      if (text !== "" && !/^[0-9]+$/.test(text)) {
        error.textContent = "The offset must be a whole number, or empty.";
        since.focus();
        return;
      }
      const extra = names.value.split(",").map((n) => n.trim()).filter(Boolean);
      this.startTail(topic.value.trim(), text === "" ? undefined : Number(text), transport.value, extra);
      button.textContent = "Stop";
    });
    return h(
      "section",
      { class: "card", "aria-labelledby": "tail-title" },
      h("h2", { id: "tail-title" }, "Live tail"),
      form,
      this.tailStatus,
      this.tailList,
    );
  }

  startTail(topic, since, transport, eventNames) {
    this.tailList.replaceChildren();
    this.tailList.dataset.duplicates = "0";
    const client = new RealtimeClient({ token: () => session.current(), transport, eventNames });
    const status = (state, text) => {
      this.tailStatus.dataset.state = state;
      this.tailStatus.textContent = text;
    };
    client.on("state", (s) => {
      const via = s.transport === "sse" ? "Server-Sent Events" : "WebSocket";
      if (s.state === "open") status("open", `Following ${topic} over ${via}.`);
      else if (s.state === "reconnecting") status("connecting", `Reconnecting over ${via}; it resumes where it stopped.`);
      else if (s.state === "connecting") status("connecting", "Connecting…");
      else status(s.state, s.state === "closed" ? "Stopped." : s.state);
    });
    client.on("error", (e) => status("error", `${e.code}: ${e.message}`));
    client.on("reset", (r) =>
      this.tailList.append(h("li", { class: "notice" }, `The server could not resume; continuing after offset ${r.offset}.`)),
    );
    client.on("event", (ev) => {
      this.tailList.dataset.duplicates = String(client.duplicatesDropped);
      this.tailList.append(
        h(
          "li",
          { dataset: { offset: ev.offset ?? "", event: ev.event, topic: ev.topic } },
          h(
            "p",
            { class: "tail-head" },
            h("strong", {}, ev.offset === undefined ? "–" : `#${ev.offset}`),
            ` ${ev.event}`,
          ),
          h("pre", {}, JSON.stringify(ev, null, 2)),
        ),
      );
    });
    client.subscribe(topic, since === undefined ? {} : { since });
    // Duplicates are dropped without an event: show the count as it changes.
    const counter = setInterval(() => (this.tailList.dataset.duplicates = String(client.duplicatesDropped)), 500);
    this.tail = { client, topic, counter };
  }

  stopTail() {
    if (!this.tail) return;
    clearInterval(this.tail.counter);
    this.tail.client.close();
    this.tail = null;
  }
}
