// The task board: the signed-in user's tasks, kept live by `activity/{user}` events, and a
// form to create a task.
//
// The list comes from GET /api/activity; `activity.list_updated` changes a row in place.
// Both are merged by `updated_at`, so whichever arrives last, the newest state wins. The
// list is read again once the activity subscription is acknowledged (nothing before it can
// be missed) and whenever the server cannot resume it. Rows of tasks that are still going
// also follow their task topic (live only) for the latest narration line.

import { api, describeError, session } from "/web/api.js";
import { h, refreshTimes, setBadge, statusBadge, timeEl } from "/web/dom.js";

const FINAL = new Set(["completed", "failed", "cancelled"]);
// Task topics the board follows at most, for the narration lines of unfinished tasks.
const MAX_WATCHED = 20;

export class BoardView {
  constructor(root, realtime) {
    this.realtime = realtime;
    this.topic = `activity/${session.who.sub}`;
    /** task_id -> {el, item} */
    this.rows = new Map();
    this.watched = new Set();
    this.cursor = null;
    this.offs = [
      realtime.on("event", (ev) => this.onEvent(ev)),
      realtime.on("ready", ({ topic }) => topic === this.topic && this.load()),
      realtime.on("reset", ({ topic }) => topic === this.topic && this.load()),
    ];
    document.title = "Tasks · etherd";
    this.render(root);
    realtime.subscribe(this.topic);
    this.load();
    this.clock = setInterval(() => refreshTimes(this.list), 30_000);
  }

  destroy() {
    clearInterval(this.clock);
    for (const off of this.offs) off();
    this.realtime.unsubscribe(this.topic);
    for (const topic of this.watched) this.realtime.unsubscribe(topic);
    this.watched.clear();
  }

  render(root) {
    this.list = h("ul", { class: "task-list", id: "task-list", "aria-labelledby": "tasks-title" });
    this.empty = h(
      "p",
      { class: "empty", id: "board-empty", hidden: true },
      "No tasks yet. Create one with the form, or through POST /api/tasks.",
    );
    this.loadError = h("p", { class: "error", role: "alert" });
    this.more = h(
      "button",
      { type: "button", class: "button", hidden: true, onclick: () => this.loadMore() },
      "Show older tasks",
    );
    this.notice = h("p", { class: "notice", id: "create-notice", role: "status" });
    root.append(
      h(
        "div",
        { class: "page-head" },
        h("h1", { id: "tasks-title" }, "Tasks"),
        h("p", { class: "muted" }, "Everything you asked for, newest change first. Rows update as agents work."),
      ),
      h(
        "div",
        { class: "board" },
        h(
          "section",
          { class: "card", "aria-label": "Your tasks" },
          this.loadError,
          this.list,
          this.empty,
          h("div", { class: "row" }, this.more),
        ),
        this.createForm(),
      ),
    );
  }

  createForm() {
    const field = (id, label, control, hint) =>
      h(
        "div",
        { class: "field" },
        h("label", { for: id }, label),
        control,
        hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null,
      );
    const prompt = h("textarea", { id: "new-prompt", name: "prompt", rows: 5, required: true });
    const title = h("input", { id: "new-title", name: "title", type: "text", autocomplete: "off" });
    const done = h("textarea", { id: "new-done", name: "definition_of_done", rows: 2 });
    const repo = h("input", { id: "new-repo", name: "repo", type: "text", autocomplete: "off", spellcheck: "false" });
    const branch = h("input", { id: "new-branch", name: "branch", type: "text", autocomplete: "off", spellcheck: "false" });
    const error = h("p", { class: "error", role: "alert" });
    const submit = h("button", { type: "submit", class: "button primary" }, "Create task");
    const form = h(
      "form",
      { class: "stack", id: "new-task", novalidate: true },
      field("new-prompt", "What should be done?", prompt),
      field("new-title", "Title (optional)", title, "Made from the first line of the request when left empty."),
      h(
        "details",
        { class: "more" },
        h("summary", {}, "More details"),
        field("new-done", "Definition of done", done),
        field("new-repo", "Repository", repo),
        field("new-branch", "Branch", branch),
      ),
      error,
      h("div", { class: "row" }, submit),
      this.notice,
    );
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!prompt.value.trim()) {
        error.textContent = "Describe the task first.";
        prompt.focus();
        return;
      }
      const body = { prompt: prompt.value.trim() };
      if (title.value.trim()) body.title = title.value.trim();
      if (done.value.trim()) body.definition_of_done = done.value.trim();
      const scope = {};
      if (repo.value.trim()) scope.repo = repo.value.trim();
      if (branch.value.trim()) scope.branch = branch.value.trim();
      if (Object.keys(scope).length) body.scope = scope;
      error.textContent = "";
      submit.disabled = true;
      try {
        const task = await api("POST", "/api/tasks", { body });
        this.upsert({
          task_id: task.id,
          status: task.status,
          title: task.title,
          last_step_message: null,
          updated_at: task.updated_at,
        }, true);
        form.reset();
        this.notice.replaceChildren(
          "Created ",
          h("a", { href: `#/tasks/${task.id}` }, task.title),
          ". A harness can claim it now.",
        );
        prompt.focus();
      } catch (err) {
        error.textContent = describeError(err);
      } finally {
        submit.disabled = false;
      }
    });
    return h(
      "section",
      { class: "card", "aria-labelledby": "new-task-title" },
      h("h2", { id: "new-task-title" }, "New task"),
      form,
    );
  }

  async load() {
    try {
      const page = await api("GET", "/api/activity?limit=50");
      this.loadError.textContent = "";
      for (const item of page.tasks) this.upsert(item, false);
      if (this.cursor === null) this.setCursor(page.next_cursor);
    } catch (err) {
      this.loadError.textContent = `The task list could not be loaded: ${describeError(err)}`;
    }
    this.empty.hidden = this.rows.size > 0;
  }

  async loadMore() {
    if (!this.cursor) return;
    try {
      const page = await api("GET", `/api/activity?limit=50&cursor=${encodeURIComponent(this.cursor)}`);
      for (const item of page.tasks) this.upsert(item, false);
      this.setCursor(page.next_cursor);
    } catch (err) {
      this.loadError.textContent = describeError(err);
    }
  }

  setCursor(cursor) {
    this.cursor = cursor;
    this.more.hidden = !cursor;
  }

  onEvent(ev) {
    if (ev.topic === this.topic && ev.event === "activity.list_updated") {
      this.upsert(
        { task_id: ev.task_id, status: ev.status, title: ev.title, updated_at: ev.updated_at },
        true,
      );
    } else if (ev.event === "os.harness.step" && this.watched.has(ev.topic)) {
      const row = this.rows.get(ev.task_id);
      if (row) this.setStep(row, ev.user_message);
    }
  }

  /**
   * Add a row or change it in place, keeping the newer of the two states.
   * @param {boolean} onTop new rows go first (a fresh change), else last (a page read)
   */
  upsert(item, onTop) {
    let row = this.rows.get(item.task_id);
    if (row && Date.parse(item.updated_at) < Date.parse(row.item.updated_at)) return;
    if (!row) {
      row = this.makeRow(item);
      this.rows.set(item.task_id, row);
      if (onTop) this.list.prepend(row.el);
      else this.list.append(row.el);
    }
    const merged = { ...row.item, ...item };
    if (item.last_step_message === undefined) merged.last_step_message = row.item.last_step_message;
    row.item = merged;
    row.el.dataset.status = merged.status;
    row.link.textContent = merged.title;
    setBadge(row.badge, merged.status);
    row.time.replaceWith((row.time = timeEl(merged.updated_at)));
    this.setStep(row, merged.last_step_message);
    this.empty.hidden = true;
    this.watch(item.task_id, merged.status);
  }

  makeRow(item) {
    const link = h("a", { class: "task-link", href: `#/tasks/${item.task_id}` });
    const badge = statusBadge(item.status);
    const step = h("p", { class: "last-step" });
    const time = h("time");
    const el = h(
      "li",
      { class: "task-row", dataset: { taskId: item.task_id } },
      h("div", { class: "task-row-head" }, link, badge),
      h("div", { class: "task-row-foot" }, step, time),
    );
    return { el, link, badge, step, time, item: { ...item } };
  }

  setStep(row, message) {
    row.item.last_step_message = message ?? null;
    row.step.textContent = message || "No progress reported yet.";
    row.step.classList.toggle("muted", !message);
  }

  /** Follow an unfinished task's topic for its narration line; stop once it is final. */
  watch(taskId, status) {
    const topic = `tasks/${taskId}`;
    if (FINAL.has(status)) {
      if (this.watched.delete(topic)) this.realtime.unsubscribe(topic);
    } else if (!this.watched.has(topic) && this.watched.size < MAX_WATCHED) {
      this.watched.add(topic);
      this.realtime.subscribe(topic);
    }
  }
}
