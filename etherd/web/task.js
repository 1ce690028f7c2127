// One task: live narration, the timeline, and by status the parked card (a question to
// answer), the delivery card, or a cancel button.
//
// The page reads GET /api/tasks/{id}, then subscribes to tasks/{id} with since 0: the
// server replays every retained event of the task and goes on live, and the client module
// never hands an offset over twice. The state shown is the snapshot with the events applied
// in offset order, so a reload at any moment shows the same thing. When the server cannot
// replay (recovered: false), the page reads the task and its timeline over HTTP instead.

import { api, describeError } from "/web/api.js";
import { deliveryCard } from "/web/delivery.js";
import { focusHeading, fullTime, h, setBadge, statusBadge, timeEl } from "/web/dom.js";

const DEBUG_KEY = "etherd.debug";
const WAITING = {
  queued: "Waiting for a harness to pick this task up.",
  running: "The agent is starting.",
  interrupted: "The agent is waiting for your answer.",
  completed: "The agent reported no progress lines.",
  failed: "The agent reported no progress lines.",
  cancelled: "The task was cancelled before the agent reported progress.",
};

export class TaskView {
  constructor(root, realtime, taskId) {
    this.realtime = realtime;
    this.id = taskId;
    this.topic = `tasks/${taskId}`;
    this.task = null;
    this.steps = [];
    this.timeline = [];
    this.shownSteps = 0;
    this.shownTimeline = 0;
    this.answering = false;
    this.parked = null;
    this.delivery = null;
    this.scheduled = false;
    this.destroyed = false;
    this.offs = [
      realtime.on("event", (ev) => ev.topic === this.topic && this.apply(ev)),
      realtime.on("reset", (r) => r.topic === this.topic && this.reload(r.offset)),
      realtime.on("ready", (r) => r.topic === this.topic && this.setSynced(true)),
    ];
    this.root = root;
    document.title = "Task · etherd";
    root.append(
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← All tasks")),
      (this.loading = h("p", { class: "muted", role: "status" }, "Loading the task…")),
    );
    this.start();
  }

  destroy() {
    this.destroyed = true;
    for (const off of this.offs) off();
    this.realtime.unsubscribe(this.topic);
  }

  async start() {
    try {
      this.task = await api("GET", `/api/tasks/${encodeURIComponent(this.id)}`);
    } catch (err) {
      if (this.destroyed) return;
      this.loading.replaceWith(
        h(
          "section",
          { class: "card narrow" },
          h("h1", {}, err.status === 404 ? "No such task" : "The task could not be loaded"),
          h("p", { class: "error", role: "alert" }, describeError(err)),
        ),
      );
      return;
    }
    if (this.destroyed) return;
    this.build();
    this.render();
    // Everything retained, in order, then live: the narration and timeline come from here.
    this.realtime.subscribe(this.topic, { since: 0 });
  }

  // -- state ---------------------------------------------------------------------------

  /** Apply one event of the task's topic (each arrives once, in offset order). */
  apply(ev) {
    const task = this.task;
    if (!task) return;
    switch (ev.event) {
      case "os.harness.step":
        this.steps.push({
          offset: ev.offset,
          user_message: ev.user_message,
          internal_label: ev.internal_label,
          phase: ev.phase,
          at: ev.ts,
        });
        break;
      case "task.timeline":
        this.timeline.push({ ...ev.entry, offset: ev.offset });
        task.status = ev.entry.status;
        task.updated_at = ev.entry.at;
        if (task.status !== "interrupted") {
          task.question = null;
          task.options = [];
        }
        break;
      case "task.interrupted":
        task.status = "interrupted";
        task.question = ev.question;
        task.options = ev.options ?? [];
        break;
      case "task.resumed":
        task.status = ev.status;
        task.question = null;
        task.options = [];
        this.answering = false;
        break;
      case "task.delivered":
      case "task.failed":
        task.delivery = { blocks: ev.blocks, status: ev.blocks?.[0]?.status, at: ev.ts };
        break;
      default:
        return;
    }
    this.schedule();
  }

  /** The server could not replay: read the task and what its timeline still holds. */
  async reload(offset) {
    try {
      const [task, tl] = await Promise.all([
        api("GET", `/api/tasks/${encodeURIComponent(this.id)}`),
        api("GET", `/api/tasks/${encodeURIComponent(this.id)}/timeline?since=0&limit=1000`),
      ]);
      if (this.destroyed) return;
      // Events after `offset` arrive live (some may have while this was read): the timeline
      // read gives what came before it.
      const before = (e) => offset === null || e.offset <= offset;
      const entries = tl.entries.filter(before);
      const steps = entries
        .filter((e) => e.kind === "step")
        .map((e) => ({ offset: e.offset, user_message: e.summary, internal_label: "", phase: e.phase, at: e.at }));
      if (!steps.length && task.last_step) steps.push({ ...task.last_step, offset: 0 });
      this.task = task;
      this.timeline = [...entries, ...this.timeline.filter((e) => !before(e))];
      this.steps = [...steps, ...this.steps.filter((e) => !before(e))];
      this.narration.replaceChildren();
      this.timelineList.replaceChildren();
      this.shownSteps = this.shownTimeline = 0;
      this.historyNote.hidden = false;
      this.schedule();
    } catch (err) {
      this.showError(describeError(err));
    }
  }

  setSynced(synced) {
    this.syncNote.hidden = synced;
    this.narration.dataset.synced = String(synced);
  }

  // -- rendering -------------------------------------------------------------------------

  build() {
    const t = this.task;
    this.title = h("h1", { id: "task-title" }, t.title);
    this.badge = statusBadge(t.status);
    this.updated = h("span");
    this.cancel = h("button", { type: "button", class: "button danger", id: "cancel-task" }, "Cancel task");
    this.cancel.addEventListener("click", () => this.doCancel());
    this.errorBox = h("p", { class: "error", role: "alert", id: "task-error" });
    this.slot = h("div", { class: "task-slot" });
    this.narration = h("ol", {
      class: "narration",
      id: "narration",
      "aria-live": "polite",
      "aria-relevant": "additions",
      "aria-labelledby": "narration-title",
    });
    this.narrationEmpty = h("p", { class: "muted", id: "narration-empty" });
    this.syncNote = h("p", { class: "muted" }, "Loading the history…");
    this.historyNote = h(
      "p",
      { class: "notice", hidden: true },
      "The server no longer keeps this task's full history; what it still has is shown.",
    );
    const debug = sessionStorage.getItem(DEBUG_KEY) === "1";
    const toggle = h("input", { type: "checkbox", id: "debug-toggle", checked: debug });
    this.narration.classList.toggle("show-labels", debug);
    toggle.addEventListener("change", () => {
      this.narration.classList.toggle("show-labels", toggle.checked);
      sessionStorage.setItem(DEBUG_KEY, toggle.checked ? "1" : "0");
    });
    this.timelineList = h("ol", { class: "timeline", id: "timeline" });
    this.narrationTitle = h("h2", { id: "narration-title" }, "Progress");
    this.loading.replaceWith(
      h(
        "div",
        { class: "task-head" },
        h("div", { class: "task-title-row" }, this.title, this.badge),
        h(
          "p",
          { class: "muted meta" },
          "Created ",
          timeEl(t.created_at),
          " · updated ",
          this.updated,
          " · ",
          h("code", {}, t.id),
        ),
        h("div", { class: "row" }, this.cancel),
      ),
      this.errorBox,
      h(
        "div",
        { class: "task-grid" },
        h(
          "div",
          { class: "task-main" },
          this.slot,
          h(
            "section",
            { class: "card", "aria-labelledby": "narration-title" },
            h(
              "div",
              { class: "section-head" },
              this.narrationTitle,
              h("label", { class: "toggle", for: "debug-toggle" }, toggle, " Show internal labels"),
            ),
            this.historyNote,
            this.narration,
            this.narrationEmpty,
            this.syncNote,
          ),
        ),
        h(
          "aside",
          { class: "task-side" },
          h(
            "section",
            { class: "card", "aria-labelledby": "request-title" },
            h("h2", { id: "request-title" }, "Request"),
            h("p", { class: "prompt" }, t.prompt),
            t.definition_of_done
              ? h("p", { class: "hint" }, h("strong", {}, "Done when: "), t.definition_of_done)
              : null,
          ),
          h(
            "section",
            { class: "card", "aria-labelledby": "timeline-title" },
            h("h2", { id: "timeline-title" }, "Timeline"),
            this.timelineList,
          ),
        ),
      ),
    );
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    // Render once per frame however many events arrived (a replay comes in a burst); the
    // timeout covers tabs in the background, where frames are paused.
    const run = () => {
      if (!this.scheduled || this.destroyed) return;
      this.scheduled = false;
      this.render();
    };
    requestAnimationFrame(run);
    setTimeout(run, 200);
  }

  render() {
    const t = this.task;
    document.title = `${t.title} · etherd`;
    this.title.textContent = t.title;
    setBadge(this.badge, t.status);
    this.updated.replaceChildren(timeEl(t.updated_at));
    this.cancel.hidden = !(t.status === "queued" || t.status === "interrupted");

    for (; this.shownSteps < this.steps.length; this.shownSteps += 1) {
      this.narration.append(stepItem(this.steps[this.shownSteps]));
    }
    this.narrationEmpty.hidden = this.steps.length > 0;
    this.narrationEmpty.textContent = WAITING[t.status] ?? "";
    for (; this.shownTimeline < this.timeline.length; this.shownTimeline += 1) {
      this.timelineList.append(timelineItem(this.timeline[this.shownTimeline]));
    }

    const parked = t.status === "interrupted" && t.question;
    if (parked && (!this.parked || this.parked.question !== t.question)) {
      this.setSlot(this.parkedCard(t.question, t.options ?? []));
    } else if (!parked && this.parked) {
      this.setSlot(null);
    }
    if (this.parked) this.parked.setBusy(this.answering);

    const delivered = (t.status === "completed" || t.status === "failed") && t.delivery;
    // The snapshot and the replayed event carry the same blocks: build the card once.
    const key = delivered ? JSON.stringify(t.delivery.blocks) : null;
    if (delivered && this.delivery?.key !== key) {
      const card = deliveryCard(t.delivery.blocks, (id, button) => this.doAction(id, button), t.title);
      this.delivery = { key, el: card };
      this.setSlot(card);
    }
  }

  /** Put a card (the parked card or the delivery) above the narration, or none. */
  setSlot(el) {
    const hadFocus = this.slot.contains(document.activeElement);
    this.slot.replaceChildren(...(el ? [el] : []));
    if (!el || !el.classList.contains("parked")) this.parked = null;
    if (!el || !el.classList.contains("delivery")) this.delivery = null;
    if (hadFocus) focusHeading(el?.querySelector("h2") ?? this.narrationTitle);
  }

  parkedCard(question, options) {
    const error = h("p", { class: "error", role: "alert" });
    const sending = h("p", { class: "muted", role: "status" });
    const text = h("textarea", { id: "answer-text", name: "answer", rows: 3, required: true });
    const send = h("button", { type: "submit", class: "button primary" }, "Send answer");
    const buttons = options.map((option) => {
      const b = h("button", { type: "button", class: "button option", dataset: { option } }, option);
      b.addEventListener("click", () => this.doAnswer({ option }, error));
      return b;
    });
    const form = h(
      "form",
      { class: "stack", novalidate: true },
      h("label", { for: "answer-text" }, options.length ? "Or write your own answer" : "Your answer"),
      text,
      h("div", { class: "row" }, send),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (!text.value.trim()) {
        error.textContent = "Write an answer first.";
        text.focus();
        return;
      }
      this.doAnswer({ answer: text.value.trim() }, error);
    });
    const el = h(
      "section",
      { class: "card parked", id: "parked", "aria-labelledby": "parked-title" },
      h("h2", { id: "parked-title" }, "The agent needs your answer"),
      h("p", { class: "question", id: "question" }, question),
      buttons.length ? h("div", { class: "options", role: "group", "aria-label": "Suggested answers" }, buttons) : null,
      form,
      error,
      sending,
    );
    this.parked = {
      question,
      setBusy: (busy) => {
        for (const b of [...buttons, send]) b.disabled = busy;
        text.readOnly = busy;
        sending.textContent = busy ? "Answer sent. Waiting for the agent to continue…" : "";
      },
    };
    return el;
  }

  async doAnswer(body, error) {
    error.textContent = "";
    this.answering = true;
    this.parked?.setBusy(true);
    try {
      // The card goes away when task.resumed arrives, not on this answer.
      await api("POST", `/api/tasks/${encodeURIComponent(this.id)}/answer`, { body });
    } catch (err) {
      this.answering = false;
      this.parked?.setBusy(false);
      error.textContent = `Your answer was not accepted: ${describeError(err)}`;
    }
  }

  async doCancel() {
    this.cancel.disabled = true;
    try {
      await api("POST", `/api/tasks/${encodeURIComponent(this.id)}/cancel`, { body: {} });
      this.showError("");
    } catch (err) {
      this.showError(`The task could not be cancelled: ${describeError(err)}`);
    } finally {
      this.cancel.disabled = false;
    }
  }

  /** Delivery actions without a link: reply (a follow-up task) and run again. */
  doAction(id, button) {
    const t = this.task;
    if (id === "run_again") {
      button.disabled = true;
      const body = { prompt: t.prompt, title: t.title, scope: t.scope ?? {}, context_refs: t.context_refs ?? [] };
      if (t.definition_of_done) body.definition_of_done = t.definition_of_done;
      this.createAndOpen(body).finally(() => (button.disabled = false));
      return;
    }
    if (document.getElementById("reply-form")) {
      document.getElementById("reply-text").focus();
      return;
    }
    const text = h("textarea", { id: "reply-text", rows: 3, required: true });
    const error = h("p", { class: "error", role: "alert" });
    const form = h(
      "form",
      { class: "stack reply", id: "reply-form", novalidate: true },
      h("label", { for: "reply-text" }, "Your follow-up (sent as a new task)"),
      text,
      error,
      h("div", { class: "row" }, h("button", { type: "submit", class: "button primary" }, "Send follow-up")),
    );
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (!text.value.trim()) {
        error.textContent = "Write the follow-up first.";
        return;
      }
      this.createAndOpen({
        prompt: text.value.trim(),
        title: `Follow-up: ${t.title}`.slice(0, 80),
        scope: t.scope ?? {},
        context_refs: [{ kind: "task", task_id: t.id }],
      }).catch((err) => (error.textContent = describeError(err)));
    });
    button.closest(".delivery").append(form);
    text.focus();
  }

  async createAndOpen(body) {
    try {
      const task = await api("POST", "/api/tasks", { body });
      location.hash = `#/tasks/${task.id}`;
    } catch (err) {
      this.showError(`The new task could not be created: ${describeError(err)}`);
      throw err;
    }
  }

  showError(text) {
    this.errorBox.textContent = text;
  }
}

function stepItem(step) {
  const label = [step.phase, step.internal_label].filter(Boolean).join(" · ");
  return h(
    "li",
    { class: "step", dataset: { offset: step.offset } },
    h("p", { class: "step-message" }, step.user_message),
    h(
      "p",
      { class: "step-meta" },
      step.at ? h("time", { datetime: step.at, title: fullTime(step.at) }, clockTime(step.at)) : null,
      label ? h("span", { class: "internal-label" }, label) : null,
    ),
  );
}

function clockTime(iso) {
  const at = Date.parse(iso);
  return Number.isNaN(at) ? "" : new Date(at).toLocaleTimeString();
}

function timelineItem(entry) {
  return h(
    "li",
    { class: "timeline-entry", dataset: { kind: entry.kind, offset: entry.offset } },
    h("span", { class: "timeline-summary" }, entry.summary),
    h("time", { datetime: entry.at, title: fullTime(entry.at), class: "muted" }, clockTime(entry.at)),
  );
}
