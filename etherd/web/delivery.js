// The delivery card: a delivery's blocks rendered top to bottom (docs/delivery-blocks.md).
// Unknown block types and unknown fields are skipped, as the format asks.

import { h, safeUrl } from "/web/dom.js";

const OUTCOME_LABELS = {
  completed: "Completed",
  no_changes: "Completed, no changes needed",
  failed: "Failed",
};

/**
 * @param {object[]} blocks
 * @param {(id: string, button: HTMLButtonElement) => void} onAction for actions without a URL
 * @param {string} [pageTitle] the title the page already shows; the outcome repeats it only
 *   when it differs
 * @returns {HTMLElement}
 */
export function deliveryCard(blocks, onAction, pageTitle) {
  const outcome = blocks.find((b) => b && b.type === "outcome");
  const card = h("section", {
    class: "card delivery",
    id: "delivery",
    "aria-labelledby": "delivery-title",
    dataset: { outcome: outcome?.status ?? "" },
  });
  let primaryDone = false;
  for (const block of blocks) {
    if (!block || typeof block !== "object") continue;
    switch (block.type) {
      case "outcome":
        card.append(
          h(
            "div",
            { class: "block outcome", dataset: { block: "outcome", status: block.status } },
            h("p", { class: "outcome-status" }, OUTCOME_LABELS[block.status] ?? String(block.status ?? "")),
            h("h2", { id: "delivery-title" }, String(block.summary || block.title || "Result")),
            block.title && block.title !== pageTitle
              ? h("p", { class: "outcome-title" }, String(block.title))
              : null,
          ),
        );
        break;
      case "hero":
        card.append(hero(block));
        break;
      case "summary":
        if (block.text) {
          card.append(
            h(
              "div",
              { class: "block summary", dataset: { block: "summary" } },
              h("h3", {}, "Notes from the agent"),
              h("p", { class: "summary-text" }, String(block.text)),
            ),
          );
        }
        break;
      case "actions": {
        const row = h("div", { class: "block actions", dataset: { block: "actions" } });
        for (const item of Array.isArray(block.items) ? block.items : []) {
          const el = action(item, !primaryDone, onAction);
          if (el) {
            row.append(el);
            primaryDone = true;
          }
        }
        if (row.childElementCount) card.append(row);
        break;
      }
      default:
        break;
    }
  }
  if (!outcome) card.prepend(h("h2", { id: "delivery-title" }, "Result"));
  return card;
}

function hero(block) {
  if (block.kind === "pull_request") {
    const url = safeUrl(block.url);
    const label = `Pull request #${Number(block.number)}`;
    return h(
      "div",
      { class: "block hero pr", dataset: { block: "hero", kind: "pull_request" } },
      h("p", { class: "eyebrow" }, "The agent opened"),
      h(
        "p",
        { class: "pr-title" },
        url ? h("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, label) : label,
      ),
      block.branch ? h("p", { class: "pr-branch" }, "Branch ", h("code", {}, String(block.branch))) : null,
    );
  }
  return h(
    "div",
    { class: "block hero text", dataset: { block: "hero", kind: String(block.kind ?? "text") } },
    h("p", { class: "hero-text" }, String(block.text ?? "")),
  );
}

function action(item, primary, onAction) {
  if (!item || typeof item.label !== "string") return null;
  const cls = primary ? "button primary" : "button";
  if (item.url !== undefined) {
    const url = safeUrl(item.url);
    if (!url) return null;
    return h(
      "a",
      { class: cls, href: url, target: "_blank", rel: "noopener noreferrer", dataset: { action: item.id } },
      item.label,
    );
  }
  if (item.id !== "reply" && item.id !== "run_again") return null;
  const button = h("button", { type: "button", class: cls, dataset: { action: item.id } }, item.label);
  button.addEventListener("click", () => onAction(item.id, button));
  return button;
}
