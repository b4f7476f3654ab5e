// The message tree on the page: "‹ 2/3 ›" between a message's alternatives, and the edit,
// regenerate and fork buttons. app.js sends the requests; this module builds the controls and
// tells when a history frame continues another branch than the one shown.

function button(label, title, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = "link";
  node.textContent = label;
  node.title = title;
  node.setAttribute("aria-label", title);
  if (onClick) node.addEventListener("click", onClick);
  else node.disabled = true;
  return node;
}

/**
 * The controls of one stored message; `actions` has `branch(seq)`, `edit(message)`,
 * `regenerate(seq)` and `fork(seq)`.
 */
export function branchControls(message, actions) {
  const bar = document.createElement("div");
  bar.className = "branch";
  const siblings = message.siblings || [message.seq];
  if (siblings.length > 1) {
    const at = siblings.indexOf(message.seq);
    const nav = document.createElement("span");
    nav.className = "siblings";
    const count = document.createElement("span");
    count.textContent = `${at + 1}/${siblings.length}`;
    nav.append(
      button("‹", "Previous alternative", at > 0 ? () => actions.branch(siblings[at - 1]) : null),
      count,
      button("›", "Next alternative",
        at < siblings.length - 1 ? () => actions.branch(siblings[at + 1]) : null),
    );
    bar.append(nav);
  }
  if (message.role === "user") {
    bar.append(button("Edit", "Edit this message", () => actions.edit(message)));
  } else {
    bar.append(button("Regenerate", "Answer again", () => actions.regenerate(message.seq)));
  }
  bar.append(button("Fork", "Continue from here in a new chat", () => actions.fork(message.seq)));
  return bar;
}

/** The next shown message after `node` that has a seq (streaming replies have none yet). */
function nextStored(node) {
  let next = node.nextElementSibling;
  while (next && !next.dataset.seq) next = next.nextElementSibling;
  return next;
}

/**
 * Whether `messages` (of a history frame) belong to another branch than the one `list`
 * shows: one of them follows a shown message that another message already follows.
 * `complete` says the list starts at the chat's first message.
 */
export function diverges(messages, list, complete) {
  for (const message of messages) {
    if (list.querySelector(`[data-seq="${message.seq}"]`)) continue;
    if (message.parent_seq == null) {
      const first = list.querySelector("[data-seq]");
      if (complete && first) return true;
      continue;
    }
    const parent = list.querySelector(`[data-seq="${message.parent_seq}"]`);
    if (parent && nextStored(parent)) return true;
  }
  return false;
}

const ENDINGS = new Set(["ResponseCompleted", "ResponseFailed", "ResponseStopped",
  "ResponseInterrupted"]);

/**
 * The event a fork from the message shown as `node` is taken at: the end of that message's
 * turn (its reply's ending event, read from the log with `events(afterSeq)`), where the
 * branch shown up to that turn was the active one. A question with no reply: itself.
 */
export async function forkPoint(node, events) {
  const reply = node.classList.contains("user") ? nextStored(node) : node;
  if (!reply || !reply.dataset.responseId) return Number(node.dataset.seq);
  let after = Number(reply.dataset.seq);
  for (;;) {
    const page = await events(after);
    const end = page.events.find((e) => ENDINGS.has(e.type)
      && e.data.response_id === reply.dataset.responseId);
    if (end) return end.seq;
    if (!page.events.length) return Number(node.dataset.seq);
    after = page.next_after_seq;
  }
}
