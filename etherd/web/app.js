// The page: signs in, keeps one realtime connection, and shows the view the address names.
//
//   #/            the task board
//   #/tasks/{id}  one task
//   #/ops         the operator view (admin tokens)

import { RealtimeClient } from "/client.js";
import { api, ApiError, describeError, session } from "/web/api.js";
import { BoardView } from "/web/board.js";
import { focusHeading, h } from "/web/dom.js";
import { OpsView } from "/web/ops.js";
import { TaskView } from "/web/task.js";

const main = document.getElementById("main");
const conn = document.getElementById("conn");
const who = document.getElementById("who");
const opsLink = document.querySelector('[data-nav="ops"]');

let config = {};
let realtime = null;
let view = null;

async function boot() {
  document.getElementById("skip").addEventListener("click", (e) => {
    e.preventDefault();
    main.focus();
  });
  document.getElementById("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", () => route(true));
  try {
    config = (await api("GET", "/api/realtime/config", { token: "" })) ?? {};
  } catch (err) {
    return showFailure(err);
  }
  session.devToken = config.dev_token ?? null;
  session.onUnauthorized = () =>
    signIn("The server refused your token (it may have expired). Paste a new one to continue.");
  const token = session.stored();
  if (token) await start(token, false);
  else signIn();
}

/** Check a token with the server, then show the app with it. */
async function start(token, given) {
  let me;
  try {
    me = await api("GET", "/api/whoami", { token });
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      session.forget();
      return signIn(given ? `That token was refused: ${err.message}` : "Your token is no longer accepted. Paste a new one.");
    }
    return showFailure(err);
  }
  session.token = token;
  session.who = me;
  if (given) session.remember(token);
  showWho(me);
  if (realtime === null) {
    realtime = new RealtimeClient({
      token: () => session.current(),
      preferWebSocket: config.prefer_websocket,
    });
    realtime.on("state", showConnection);
    realtime.on("token", () => showConnection({ state: realtime.state, transport: realtime.transport }));
  } else if (realtime.state === "unauthorized") {
    realtime.reconnect();
  } else {
    realtime.refreshToken();
  }
  realtime.connect();
  route(false);
}

function showWho(me) {
  who.hidden = false;
  document.getElementById("who-name").textContent = me.dev ? `${me.sub} (development mode)` : me.sub;
  // The development token comes back by itself, so signing out of it means nothing.
  document.getElementById("sign-out").hidden = me.dev;
  opsLink.hidden = me.role !== "admin";
}

function signOut() {
  session.forget();
  realtime?.close();
  who.hidden = true;
  opsLink.hidden = true;
  signIn("You are signed out.");
}

/** The sign-in form: a token kept for this tab only. */
function signIn(message) {
  view?.destroy();
  view = null;
  const input = h("textarea", {
    id: "token-input",
    name: "token",
    rows: 4,
    required: true,
    autocomplete: "off",
    spellcheck: "false",
    "aria-describedby": "token-help",
  });
  const error = h("p", { id: "sign-in-error", class: "error", role: "alert" });
  const form = h(
    "form",
    { class: "stack", novalidate: true },
    h("label", { for: "token-input" }, "Access token"),
    input,
    h(
      "p",
      { id: "token-help", class: "hint" },
      "Get one from whoever runs this server, or with ",
      h("code", {}, "etherd token --sub YOU --role user"),
      ". It is kept in this browser tab only and forgotten when the tab closes.",
    ),
    error,
    h("div", { class: "row" }, h("button", { type: "submit", class: "button primary" }, "Sign in")),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (!token) {
      error.textContent = "Paste a token first.";
      input.focus();
      return;
    }
    error.textContent = "";
    await start(token, true);
  });
  main.replaceChildren(
    h(
      "section",
      { class: "card narrow", "aria-labelledby": "sign-in-title" },
      h("h1", { id: "sign-in-title" }, "Sign in to etherd"),
      message ? h("p", { class: "notice", role: "status" }, message) : null,
      form,
    ),
  );
  input.focus();
}

function showFailure(err) {
  main.replaceChildren(
    h(
      "section",
      { class: "card narrow", "aria-labelledby": "failure-title" },
      h("h1", { id: "failure-title" }, "Cannot reach etherd"),
      h("p", { class: "error", role: "alert" }, describeError(err)),
      h("button", { type: "button", class: "button", onclick: () => location.reload() }, "Try again"),
    ),
  );
}

const CONNECTION_TEXT = {
  idle: "Offline",
  connecting: "Connecting…",
  open: "Live",
  reconnecting: "Reconnecting…",
  unauthorized: "Signed out",
  closed: "Offline",
};

function showConnection(change) {
  conn.dataset.state = change.state;
  // For diagnostics: events the client dropped as already seen (a resume should cause none).
  conn.dataset.duplicates = String(realtime?.duplicatesDropped ?? 0);
  conn.dataset.transport = change.transport ?? "";
  let text = CONNECTION_TEXT[change.state] ?? change.state;
  if (change.state === "open") text += change.transport === "sse" ? " · SSE" : " · WebSocket";
  if (change.state === "reconnecting" && change.delayMs) {
    text += ` retrying in ${Math.max(1, Math.round(change.delayMs / 1000))} s`;
  }
  conn.textContent = text;
  if (change.state === "unauthorized" && session.token !== null) {
    signIn("Your token has expired. Paste a new one to continue.");
  }
}

/** Show the view the address names. */
function route(moved) {
  if (!session.who) return;
  view?.destroy();
  view = null;
  main.replaceChildren();
  const hash = location.hash || "#/";
  const task = /^#\/tasks\/([A-Za-z0-9_.:-]+)$/.exec(hash);
  let current = "board";
  if (task) {
    current = "task";
    view = new TaskView(main, realtime, task[1]);
  } else if (hash === "#/ops") {
    current = "ops";
    if (session.who.role === "admin") {
      view = new OpsView(main, realtime);
    } else {
      document.title = "Not allowed · etherd";
      main.append(
        h("h1", {}, "Operator view"),
        h("p", { class: "notice" }, "The operator view needs an admin token."),
      );
    }
  } else {
    view = new BoardView(main, realtime);
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === current) link.setAttribute("aria-current", "page");
    // A task page is part of Tasks, without being the page the link opens.
    else if (current === "task" && link.dataset.nav === "board") link.setAttribute("aria-current", "true");
    else link.removeAttribute("aria-current");
  }
  if (moved) focusHeading(main.querySelector("h1"));
}

boot();
