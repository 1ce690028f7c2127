// Small DOM helpers shared by the views. Text is always set as text, never parsed as HTML:
// everything shown comes from harnesses and users.

/**
 * Build an element: h("a", {href: "#/", class: "x"}, "text", child, ...).
 * Attributes whose value is false, null or undefined are left out; `on<name>` keys add
 * listeners; `dataset` takes an object.
 * @returns {HTMLElement}
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** Human names of task statuses. */
export const STATUS_LABELS = Object.freeze({
  queued: "Queued",
  running: "Running",
  interrupted: "Needs your answer",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
});

/** A status badge. @param {string} status */
export function statusBadge(status) {
  return h("span", { class: "badge", dataset: { status } }, STATUS_LABELS[status] ?? status);
}

/** Point an existing badge at another status. */
export function setBadge(el, status) {
  el.dataset.status = status;
  el.textContent = STATUS_LABELS[status] ?? status;
}

/** "just now", "5 min ago", "3 h ago", else a date; for RFC 3339 times. */
export function relativeTime(iso, now = Date.now()) {
  const at = Date.parse(iso);
  if (Number.isNaN(at)) return "";
  const s = Math.round((now - at) / 1000);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(at).toLocaleDateString(undefined, { day: "numeric", month: "short", year: "numeric" });
}

/** Local date and time for a title or a timeline line. */
export function fullTime(iso) {
  const at = Date.parse(iso);
  return Number.isNaN(at) ? "" : new Date(at).toLocaleString();
}

/** A <time> that shows a relative time and carries the exact one. */
export function timeEl(iso) {
  return h("time", { datetime: iso, title: fullTime(iso) }, relativeTime(iso));
}

/** Refresh every relative <time> under root (they age while the page is open). */
export function refreshTimes(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    el.textContent = relativeTime(el.getAttribute("datetime"));
  }
}

/** Only http(s) links are followed: a harness could send anything as a URL. */
export function safeUrl(url) {
  try {
    const parsed = new URL(String(url), location.href);
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
  } catch {
    return null;
  }
}

/** Move focus to an element that is not normally focusable (a heading), for screen readers. */
export function focusHeading(el) {
  if (!el) return;
  el.setAttribute("tabindex", "-1");
  el.focus({ preventScroll: false });
}
