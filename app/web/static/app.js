// The eventchat web client: REST for chats and stats, one WebSocket for everything live.
// It speaks wire contract version 1.1 (docs: PROTOCOL). No build step: the libraries it uses
// (markdown, sanitizing, syntax colouring) are vendored in ./vendor (scripts/update-vendor.sh).
//
// Rendering is idempotent: a message is keyed by its seq (user) or response_id (assistant)
// and reply text is placed by `offset`, counted in code points as the contract counts it, so
// REST pages, `chat_history` frames and a resumed stream can overlap in any order without
// doubling or losing anything.

import { createPlayer, download } from "./player.js";
import { copyCode, renderMarkdown, snippetNodes } from "./render.js";
import { codePointCount, placeDelta, shortTitle } from "./text.js";
import { branchControls, diverges, forkPoint } from "./tree.js";

const TOKEN_KEY = "eventchat.token";
const PAGE_SIZE = 50;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
const SEARCH_DELAY_MS = 250;
const HIT_HIGHLIGHT_MS = 4000;
/** Older pages a search hit may load to reach its message. */
const JUMP_MAX_PAGES = 40;
const STATUS_LABELS = {
  pending: "sending…", sent: "sent", rejected: "not sent", streaming: "streaming…",
  complete: "complete", stopped: "stopped", failed: "failed", interrupted: "interrupted",
};

const $ = (id) => document.getElementById(id);
const ui = {
  layout: $("layout"), sidebar: $("sidebar"), toggleSidebar: $("toggle-sidebar"),
  newChat: $("new-chat"), search: $("search-input"), searchForm: $("search-form"),
  chatList: $("chat-list"), chatListEmpty: $("chat-list-empty"),
  stats: $("stats"), statsBody: $("stats-body"), statsRefresh: $("stats-refresh"),
  title: $("chat-title"), connection: $("connection"),
  alert: $("alert"), alertText: $("alert-text"), alertClose: $("alert-close"),
  messages: $("messages"), list: $("message-list"), empty: $("messages-empty"),
  loadOlder: $("load-older"), composer: $("composer"), input: $("composer-input"),
  send: $("send"), stop: $("stop"), shortcuts: $("shortcuts"),
  tokenDialog: $("token-dialog"), tokenForm: $("token-form"), tokenInput: $("token-input"),
  tokenError: $("token-error"),
  logCheck: $("log-check"), chatActions: $("chat-actions"), renameChat: $("rename-chat"),
  deleteChat: $("delete-chat"), renameDialog: $("rename-dialog"), renameForm: $("rename-form"),
  renameInput: $("rename-input"), renameError: $("rename-error"),
  deleteDialog: $("delete-dialog"), deleteForm: $("delete-form"), deleteName: $("delete-name"),
  deleteError: $("delete-error"),
};

const state = {
  token: null,
  chatId: null, // the selected chat; null while drafting a new one
  lastSeq: 0, // every frame of the selected chat up to this seq has been applied
  loaded: false, // its first page is shown: following it may start from lastSeq
  oldestSeq: null, // the oldest loaded message, for "load older"
  view: 0, // bumped on every chat switch, so late answers for another chat are dropped
  responses: new Map(), // response_id -> reply view
  outbox: new Map(), // client_message_id -> {chatId, message, el}, until acknowledged
  creating: null, // the POST /chat of a draft in flight
  opening: null, // the openChat in flight, for a search hit to wait for
  ws: null,
  attempts: 0,
  retryTimer: null,
  editing: null, // the user message the composer's text is to replace (an edit), or null
};

const player = createPlayer({ api, send: wsSend });

// -- token -------------------------------------------------------------------------------

function storage(action, value) {
  try {
    if (action === "get") return localStorage.getItem(TOKEN_KEY);
    if (action === "set") localStorage.setItem(TOKEN_KEY, value);
    if (action === "remove") localStorage.removeItem(TOKEN_KEY);
  } catch { /* storage disabled: the token lives as long as the page */ }
  return null;
}

function takeToken() {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    storage("set", fromUrl);
    url.searchParams.delete("token");
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
  }
  return fromUrl || storage("get");
}

function askForToken(reason) {
  state.token = null;
  storage("remove");
  disconnect();
  ui.tokenError.hidden = !reason;
  ui.tokenError.textContent = reason || "";
  if (!ui.tokenDialog.open) ui.tokenDialog.showModal();
}

// -- REST --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (response.ok) return data;
  const error = (data && data.error) || {};
  if (response.status === 401) askForToken("That token was not accepted.");
  throw new ApiError(response.status, error.code || `http_${response.status}`,
    error.message || response.statusText);
}

// -- WebSocket ---------------------------------------------------------------------------

function connect() {
  clearTimeout(state.retryTimer);
  if (!state.token || state.ws) return;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(
    `${scheme}//${location.host}/ws/chat?access_token=${encodeURIComponent(state.token)}`);
  state.ws = ws;
  setConnection("connecting", "Connecting…");
  ws.onopen = () => {
    state.attempts = 0;
    setConnection("open", "Connected");
    resume();
  };
  ws.onmessage = (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    handleFrame(frame);
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    player.halt(); // a replay ends with its connection
    reconnectLater(event);
  };
}

function disconnect() {
  clearTimeout(state.retryTimer);
  const ws = state.ws;
  state.ws = null;
  if (ws) ws.close(1000);
  setConnection("closed", "Signed out");
}

function reconnectLater(event) {
  if (!state.token) return;
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** state.attempts);
  const delay = Math.round(base * (0.75 + Math.random() * 0.5));
  state.attempts += 1;
  const why = event.code === 1001 ? "Server restarting" : "Disconnected";
  setConnection("waiting", `${why}; reconnecting in ${Math.ceil(delay / 1000)} s…`);
  state.retryTimer = setTimeout(connect, delay);
  // a refused handshake (bad token) looks like any drop: ask REST, which says 401
  if (state.attempts >= 2) api("/chats?limit=1").catch(() => {});
}

function wsSend(frame) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

/** After (re)connecting: follow the selected chat from the last seen seq, resend the unacked. */
function resume() {
  if (state.chatId) subscribe();
  for (const [id, item] of state.outbox) {
    wsSend({ event: "user_message", chat_id: item.chatId, message: item.message,
      client_message_id: id });
  }
}

function subscribe() {
  if (!state.loaded) return; // openChat follows it once its page is in
  wsSend({ event: "subscribe", chat_id: state.chatId, after_seq: state.lastSeq });
}

function setConnection(kind, text) {
  ui.connection.dataset.state = kind;
  ui.connection.textContent = text;
}

// -- frames ------------------------------------------------------------------------------

function handleFrame(frame) {
  if (frame.replay) return player.onFrame(frame); // the replay player's, not the live view's
  if (frame.event === "ack") return onAck(frame);
  if (frame.event === "error") return onError(frame);
  if (frame.chat_id !== state.chatId) return; // a chat this page no longer shows
  if (frame.event === "ai_response") return frame.done ? onDone(frame) : onDelta(frame);
  if (frame.event === "tool_activity") return onTool(frame);
  if (frame.event === "tool_approval") return onApproval(frame);
  if (frame.event === "tool_decided") return onDecided(frame);
  if (frame.event === "backend_status") return onStatus(frame);
  if (frame.event === "chat_history") return onHistory(frame);
}

function onAck(frame) {
  const item = state.outbox.get(frame.client_message_id);
  state.outbox.delete(frame.client_message_id);
  if (item && frame.chat_id === state.chatId) {
    setMessageSeq(item.el, frame.seq);
    setState(item.el, "sent");
  }
  refreshChats();
}

function onDelta(frame) {
  const reply = replyView(frame.response_id);
  // `offset` counts code points: an emoji is one, though two UTF-16 units in `text`
  const placed = placeDelta(reply.text, reply.length, frame.offset, frame.delta);
  if (placed === null) {
    // text is missing before this piece: follow again, which resends the reply from 0
    if (!reply.resyncing) { reply.resyncing = true; subscribe(); }
    return;
  }
  reply.resyncing = false;
  setReplyStatus(reply, "streaming");
  setReplyText(reply, placed.text, placed.total);
}

/** A complete reply that the model's token limit cut short says so. */
function setFinishReason(reply, reason) {
  reply.cut.hidden = reason !== "length";
}

function onDone(frame) {
  const reply = replyView(frame.response_id);
  setReplyStatus(reply, frame.status);
  setReplyText(reply, frame.message);
  setFinishReason(reply, frame.finish_reason);
  state.lastSeq = Math.max(state.lastSeq, frame.seq);
  if (frame.status === "failed" || frame.status === "interrupted") revealError(reply);
  refreshChats();
  checkLog();
  if (ui.stats.open) loadStats();
}

function onTool(frame) {
  const reply = replyView(frame.response_id);
  renderTool(reply, frame);
}

/** A tool call waits for a person: its arguments, and Approve / Deny (with a reason). */
function onApproval(frame) {
  const reply = replyView(frame.response_id);
  renderTool(reply, { ...frame, status: "waiting for approval" });
  const node = reply.calls.get(frame.call_id);
  if (node.querySelector(".approval")) return; // asked again (a resubscribe)
  const box = el("form", "approval");
  box.setAttribute("aria-label", `Approve ${frame.tool}?`);
  const reason = el("input", "approval-reason");
  reason.placeholder = "Reason (optional)";
  reason.maxLength = 500;
  const approve = el("button", "approve", "Approve");
  const deny = el("button", "deny", "Deny");
  approve.type = deny.type = "button";
  const decide = (yes) => {
    approve.disabled = deny.disabled = true;
    const decision = { event: "tool_decision", chat_id: frame.chat_id, call_id: frame.call_id,
      approve: yes };
    if (reason.value.trim()) decision.reason = reason.value.trim();
    wsSend(decision);
  };
  approve.addEventListener("click", () => decide(true));
  deny.addEventListener("click", () => decide(false));
  box.append(el("span", "approval-question", `Run ${frame.tool}?`), reason, approve, deny);
  pinned(() => node.append(box));
}

/** A decision was recorded (here, in another tab or by the timeout). */
function onDecided(frame) {
  const reply = replyView(frame.response_id);
  const node = reply.calls.get(frame.call_id);
  if (!node) return;
  node.querySelector(".approval")?.remove();
  const why = frame.reason ? `: ${frame.reason}` : "";
  const status = frame.approve ? "approved" : `denied${why}`;
  node.dataset.status = frame.approve ? "approved" : "failed";
  node.querySelector(".tool-status").textContent = `${status} by ${frame.decided_by}`;
}

function onStatus(frame) {
  const reply = replyView(frame.response_id);
  renderUsage(reply, {
    model: frame.model, tokens: frame.tokens_used, prompt: frame.prompt_tokens,
    completion: frame.completion_tokens, ttft: frame.ttft_ms, tps: frame.tokens_per_second,
    duration: frame.latency_ms, estimated: frame.estimated,
  });
}

function onHistory(frame) {
  if (diverges(frame.messages, ui.list, ui.loadOlder.hidden)) {
    loadChat(state.chatId, { push: false }); // another branch: show it from the views
    return;
  }
  for (const message of frame.messages) renderMessage(message);
  state.lastSeq = Math.max(state.lastSeq, frame.last_seq);
}

function onError(frame) {
  const text = frame.code === "rate_limited"
    ? `Slow down: ${frame.message}` : `${frame.message} (${frame.code})`;
  if (frame.chat_id && state.chatId && frame.chat_id !== state.chatId) return;
  if (frame.code === "chat_not_found" && frame.chat_id === state.chatId && !frame.response_id) {
    newDraft(); // deleted (in another tab, on another device)
    refreshChats();
    showAlert("That chat was deleted.");
    return;
  }
  if (!frame.response_id) showAlert(text); // a failed reply says so in place
  const item = frame.client_message_id && state.outbox.get(frame.client_message_id);
  if (item) {
    state.outbox.delete(frame.client_message_id);
    rejectMessage(item, frame.client_message_id, frame.message);
  }
  if (frame.response_id) {
    const reply = replyView(frame.response_id);
    showReplyError(reply, { code: frame.code, message: frame.message });
    revealError(reply);
  }
  updateStopButton();
}

// -- rendering ---------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Runs `change`, keeping the view at the bottom if it was there (reading the latest). */
function pinned(change) {
  const follow = nearBottom();
  change();
  if (follow) scrollToBottom();
}

/** Puts a message in seq order; messages with no seq yet stay at the end. */
function place(node) {
  const seq = Number(node.dataset.seq);
  let before = null;
  if (node.dataset.seq) {
    for (const other of ui.list.children) {
      if (other !== node && (!other.dataset.seq || Number(other.dataset.seq) > seq)) {
        before = other;
        break;
      }
    }
  }
  if (node.nextSibling !== before || node.parentNode !== ui.list) {
    pinned(() => ui.list.insertBefore(node, before));
  }
  ui.empty.hidden = true;
}

function setMessageSeq(node, seq) {
  if (seq == null || node.dataset.seq === String(seq)) return;
  node.dataset.seq = String(seq);
  state.oldestSeq = state.oldestSeq == null ? seq : Math.min(state.oldestSeq, seq);
  place(node);
}

function setState(node, status) {
  const label = node.querySelector(".state");
  label.dataset.state = status;
  label.textContent = STATUS_LABELS[status] || status;
}

function messageShell(role) {
  const node = el("li", `message ${role}`);
  node.append(el("span", "who", role === "user" ? "You" : "Assistant"));
  return node;
}

function renderUserMessage(message, clientId) {
  const selector = clientId ? `[data-client-id="${CSS.escape(clientId)}"]`
    : `.user[data-seq="${message.seq}"]`;
  let node = ui.list.querySelector(selector);
  if (!node) {
    node = messageShell("user");
    if (clientId) node.dataset.clientId = clientId;
    const meta = el("div", "meta");
    meta.append(el("span", "state"));
    node.append(el("div", "text"), meta);
    setState(node, message.seq == null ? "pending" : "sent");
  }
  node.querySelector(".text").textContent = message.content;
  const keepAtEnd = message.seq == null;
  if (keepAtEnd) place(node);
  else setMessageSeq(node, message.seq);
  if (message.created_at) node.title = new Date(message.created_at).toLocaleString();
  return node;
}

function replyView(responseId) {
  let reply = state.responses.get(responseId);
  if (reply) return reply;
  const node = messageShell("assistant");
  node.dataset.responseId = responseId;
  const tools = el("div", "tools");
  const text = el("div", "text markdown");
  text.setAttribute("aria-live", "polite");
  const meta = el("div", "meta");
  const usage = el("span", "usage");
  meta.append(el("span", "state"), usage);
  const error = el("div", "reply-error");
  error.setAttribute("role", "alert");
  error.hidden = true;
  const cut = el("p", "reply-cut",
    "Cut short: the reply reached its token limit (max_tokens).");
  cut.hidden = true;
  node.append(tools, text, cut, meta, error);
  reply = {
    node, textNode: text, tools, usage, error, cut, calls: new Map(), status: "streaming",
    text: "", // the reply's markdown so far...
    length: 0, // ...and its length in code points, the unit of `offset`
    shown: null, // the text last rendered, and whether as final
    shownFinal: false,
    renderTimer: null,
    renderCostMs: 0,
    resyncing: false,
    estimated: false,
    failure: null, // {code, message} of a failed reply
  };
  state.responses.set(responseId, reply);
  setReplyStatus(reply, "streaming");
  place(node);
  return reply;
}

function setReplyText(reply, text, length = null) {
  if (reply.text !== text) {
    reply.text = text;
    reply.length = length ?? codePointCount(text);
  }
  scheduleRender(reply);
}

/**
 * Renders the reply's markdown: at once when it is final, else at the next animation frame,
 * at most one rendering per frame, spaced out further when rendering gets slow (long replies).
 */
function scheduleRender(reply) {
  const final = reply.status !== "streaming";
  if (reply.shown === reply.text && reply.shownFinal === final) return;
  if (final) { renderReply(reply); return; }
  if (reply.renderTimer !== null) return;
  const pause = reply.renderCostMs > 8 ? reply.renderCostMs * 4 : 0;
  reply.renderTimer = setTimeout(() => requestAnimationFrame(() => {
    reply.renderTimer = null;
    if (reply.status === "streaming") renderReply(reply);
  }), pause);
}

function renderReply(reply) {
  const final = reply.status !== "streaming";
  if (reply.shown === reply.text && reply.shownFinal === final) return;
  const started = performance.now();
  pinned(() => renderMarkdown(reply.textNode, reply.text, { final }));
  reply.renderCostMs = performance.now() - started;
  reply.shown = reply.text;
  reply.shownFinal = final;
}

function setReplyStatus(reply, status) {
  const changed = reply.status !== status;
  reply.status = status;
  reply.node.dataset.status = status;
  setState(reply.node, status);
  // announce the reply once, whole, when it ends
  reply.textNode.setAttribute("aria-busy", String(status === "streaming"));
  if (changed) {
    scheduleRender(reply);
    renderReplyError(reply);
  }
  updateStopButton();
}

/** The error of a failed reply: its message and code. */
function showReplyError(reply, error) {
  const info = typeof error === "string" ? { message: error } : error || {};
  reply.failure = { code: info.code || null, message: info.message || "the response failed" };
  renderReplyError(reply);
}

/** What went wrong (a failed reply), and a retry (a failed or interrupted one). */
function renderReplyError(reply) {
  const retryable = reply.status === "failed" || reply.status === "interrupted";
  if (!retryable && !reply.failure) {
    reply.error.hidden = true;
    reply.error.replaceChildren();
    return;
  }
  const parts = [];
  if (reply.failure) {
    const text = el("p", "error-text");
    text.append(el("strong", null, "The reply failed: "), reply.failure.message);
    if (reply.failure.code) {
      text.append(" ", el("code", "error-code", reply.failure.code));
    }
    parts.push(text);
  }
  const question = retryable && questionOf(reply);
  if (question) {
    const retry = el("button", "retry", "Retry");
    retry.type = "button";
    retry.title = "Send the question again";
    retry.addEventListener("click", async () => {
      retry.disabled = true;
      if (await sendMessage(question)) retry.remove();
      else retry.disabled = false;
    });
    parts.push(retry);
  }
  reply.error.replaceChildren(...parts);
  reply.error.hidden = parts.length === 0;
}

/** The text of the user message a reply answers: the nearest one above it. */
function questionOf(reply) {
  let node = reply.node.previousElementSibling;
  while (node && !node.classList.contains("user")) node = node.previousElementSibling;
  return node ? node.querySelector(".text").textContent : null;
}

/** Brings a failed reply's error into view (it may have landed below the fold). */
function revealError(reply) {
  if (reply.error.hidden) return;
  requestAnimationFrame(() => reply.error.scrollIntoView({ block: "nearest" }));
}

function renderTool(reply, call) {
  let node = reply.calls.get(call.call_id);
  if (!node) {
    node = el("div", "tool");
    const head = el("div", "tool-head");
    head.append(el("span", "tool-name"), el("span", "tool-status"));
    node.append(head);
    reply.calls.set(call.call_id, node);
    pinned(() => reply.tools.append(node));
  }
  const status = call.status || (call.error ? "failed" : "completed");
  node.dataset.status = status;
  if (call.tool) node.querySelector(".tool-name").textContent = `Tool: ${call.tool}`;
  const took = call.duration_ms != null ? ` in ${formatMs(call.duration_ms)}` : "";
  node.querySelector(".tool-status").textContent = `${status}${took}`;
  if (call.arguments !== undefined) toolPart(node, "arguments", "Arguments", call.arguments);
  if (call.result !== undefined && call.result !== null) toolPart(node, "result", "Result", call.result);
  if (call.error) toolPart(node, "error", "Error", call.error);
}

function toolPart(node, name, label, value) {
  let part = node.querySelector(`[data-part="${name}"]`);
  if (!part) {
    part = el("pre");
    part.dataset.part = name;
    part.setAttribute("aria-label", label);
    node.append(part);
  }
  const shown = typeof value === "string" ? value : JSON.stringify(value);
  part.textContent = `${label.toLowerCase()}: ${shown}`;
}

function renderUsage(reply, u) {
  const parts = [];
  if (u.model) parts.push(u.model);
  // the model reported no usage: these are the server's estimates, and say so
  reply.estimated = reply.estimated || Boolean(u.estimated);
  // a stopped or failed reply may have no usage from the model: show none rather than zeros
  if (u.tokens) {
    const about = reply.estimated ? "≈" : "";
    const note = reply.estimated ? ", estimated" : "";
    parts.push(`${about}${u.tokens} tokens (${u.prompt ?? 0} in, ${u.completion ?? 0} out${note})`);
  }
  reply.usage.title = reply.estimated
    ? "The model reported no token counts: these are estimates." : "";
  if (u.ttft != null) parts.push(`TTFT ${formatMs(u.ttft)}`);
  if (u.tps) parts.push(`${Number(u.tps).toFixed(1)} tok/s`);
  if (u.duration != null) parts.push(`total ${formatMs(u.duration)}`);
  reply.usage.textContent = parts.join(" · ");
}

/** A stored message (REST page or chat_history frame). */
function renderMessage(message) {
  if (message.role === "user") {
    const pending = message.client_message_id
      && ui.list.querySelector(`[data-client-id="${CSS.escape(message.client_message_id)}"]`);
    const node = renderUserMessage(message, pending ? message.client_message_id : null);
    setState(node, "sent");
    showBranch(node, message);
    return;
  }
  const reply = replyView(message.response_id);
  setMessageSeq(reply.node, message.seq);
  const content = message.content || "";
  setReplyStatus(reply, message.status);
  setFinishReason(reply, message.finish_reason);
  if (message.status !== "streaming" || codePointCount(content) > reply.length) {
    setReplyText(reply, content);
  }
  for (const call of message.tool_calls || []) renderTool(reply, call);
  const usage = message.usage || {};
  const timing = message.timing || {};
  if (message.status !== "streaming") {
    renderUsage(reply, {
      model: message.model, tokens: usage.total_tokens, prompt: usage.prompt_tokens,
      completion: usage.completion_tokens, ttft: timing.ttft_ms,
      tps: timing.tokens_per_second, duration: timing.duration_ms, estimated: usage.estimated,
    });
  }
  if (message.error) showReplyError(reply, message.error);
  showBranch(reply.node, message);
}

// -- branches ----------------------------------------------------------------------------

const branchActions = {
  branch: (seq) => request(`/chat/${state.chatId}/branch`, { seq },
    () => loadChat(state.chatId, { push: false })),
  regenerate: (seq) => wsSend({ event: "regenerate", chat_id: state.chatId, seq,
    client_message_id: newClientId() }),
  edit: (message) => {
    state.editing = message.seq;
    ui.input.value = message.content;
    ui.input.dataset.placeholder ??= ui.input.placeholder;
    ui.input.placeholder = "Edit the message (Esc cancels)";
    ui.input.focus();
  },
  fork: async (seq) => {
    const node = ui.list.querySelector(`[data-seq="${seq}"]`);
    const chatId = state.chatId;
    const events = (after) => api(`/chat/${chatId}/events?after_seq=${after}&limit=500`);
    let atSeq;
    try {
      atSeq = await forkPoint(node, events);
    } catch (error) {
      showAlert(error.message);
      return;
    }
    request(`/chat/${chatId}/fork`, { at_seq: atSeq }, (chat) => {
      refreshChats();
      openChat(chat.id);
    });
  },
};

function showBranch(node, message) {
  node.querySelector(".branch")?.remove();
  if (message.seq != null) node.append(branchControls(message, branchActions));
}

async function request(path, body, then) {
  try {
    then(await api(path, { method: "POST", body }));
  } catch (error) {
    showAlert(error.message);
  }
}

function stopEditing() {
  state.editing = null;
  ui.input.placeholder = ui.input.dataset.placeholder ?? ui.input.placeholder;
}

function rejectMessage(item, clientId, reason) {
  setState(item.el, "rejected");
  item.el.querySelector(".state").title = reason;
  if (item.el.querySelector(".retry")) return;
  const retry = el("button", "link retry", "Retry");
  retry.type = "button";
  retry.addEventListener("click", () => {
    retry.remove();
    setState(item.el, "pending");
    state.outbox.set(clientId, item);
    wsSend({ event: "user_message", chat_id: item.chatId, message: item.message,
      client_message_id: clientId });
  });
  item.el.querySelector(".meta").append(retry);
}

function updateStopButton() {
  const streaming = [...state.responses.values()].some((r) => r.status === "streaming");
  ui.stop.hidden = !streaming;
}

function nearBottom() {
  const box = ui.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function showAlert(text) {
  ui.alertText.textContent = text;
  ui.alert.hidden = false;
}

/** Milliseconds, readable from a tool's 0.14 ms to a reply's 12.5 s. */
function formatMs(ms) {
  if (ms == null) return "–";
  if (ms === 0) return "0 ms";
  if (ms < 1) return `${Number(ms.toPrecision(2))} ms`;
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function formatWhen(iso) {
  const when = new Date(iso);
  const today = new Date().toDateString() === when.toDateString();
  return today ? when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : when.toLocaleDateString();
}

// -- chats -------------------------------------------------------------------------------

function clearChatView() {
  state.view += 1;
  player.close();
  ui.logCheck.hidden = true;
  ui.chatActions.hidden = true;
  state.responses.clear();
  state.lastSeq = 0;
  state.loaded = false;
  state.oldestSeq = null;
  ui.list.replaceChildren();
  ui.empty.hidden = false;
  ui.loadOlder.hidden = true;
  updateStopButton();
}

function openChat(chatId, options) {
  const opening = loadChat(chatId, options);
  state.opening = opening;
  return opening;
}

async function loadChat(chatId, { push = true } = {}) {
  if (state.chatId && state.chatId !== chatId) wsSend({ event: "unsubscribe", chat_id: state.chatId });
  clearChatView();
  state.chatId = chatId;
  if (push && location.hash !== `#${chatId}`) history.pushState(null, "", `#${chatId}`);
  markSelected();
  closeSidebar();
  const view = state.view;
  try {
    const page = await api(`/chat/${chatId}?limit=${PAGE_SIZE}`);
    if (view !== state.view) return;
    ui.title.textContent = page.chat.title;
    ui.chatActions.hidden = false;
    checkLog();
    for (const message of page.messages) renderMessage(message);
    const seqs = page.messages.map((m) => m.seq);
    state.lastSeq = Math.max(state.lastSeq, ...seqs, 0);
    ui.loadOlder.hidden = !page.has_more;
    ui.empty.hidden = page.messages.length > 0 || ui.list.children.length > 0;
    scrollToBottom();
  } catch (error) {
    if (view !== state.view) return;
    if (error.status === 404) { newDraft(); showAlert("That chat does not exist (any more)."); return; }
    showAlert(error.message);
  }
  state.loaded = true;
  subscribe();
}

function newDraft() {
  if (state.chatId) wsSend({ event: "unsubscribe", chat_id: state.chatId });
  clearChatView();
  state.chatId = null;
  ui.title.textContent = "New chat";
  if (location.hash) history.pushState(null, "", location.pathname + location.search);
  markSelected();
  closeSidebar();
  ui.input.focus();
}

// -- the open chat: its log's check, rename, delete --------------------------------------

/** Shows whether the open chat's stored log still verifies (GET /chat/{id}/audit); shows
 * nothing when the server has no such route or cannot say. */
async function checkLog() {
  const chatId = state.chatId;
  const view = state.view;
  if (!chatId) return;
  try {
    const audit = await api(`/chat/${chatId}/audit`);
    if (view !== state.view) return;
    ui.logCheck.dataset.valid = String(audit.valid);
    ui.logCheck.textContent = audit.valid ? "✓ log verified"
      : `⚠ log altered at event ${audit.first_invalid_seq} (${audit.reason})`;
    ui.logCheck.title = audit.valid
      ? `Every stored event of this chat, up to event ${audit.head_seq}, is as it was written.`
      : "The stored events of this chat no longer match their audit chain.";
    ui.logCheck.hidden = false;
  } catch (error) {
    if (view === state.view) ui.logCheck.hidden = true;
  }
}

function askRename() {
  if (!state.chatId) return;
  ui.renameInput.value = ui.title.textContent;
  ui.renameError.hidden = true;
  ui.renameDialog.showModal();
  ui.renameInput.select();
}

async function rename(event) {
  event.preventDefault();
  const chatId = state.chatId;
  const title = ui.renameInput.value.trim();
  if (!chatId || !title) return;
  try {
    const chat = await api(`/chat/${chatId}`, { method: "PATCH", body: { title } });
    if (chatId === state.chatId) ui.title.textContent = chat.title;
    ui.renameDialog.close();
    refreshChats();
  } catch (error) {
    ui.renameError.textContent = error.message;
    ui.renameError.hidden = false;
  }
}

function askDelete() {
  if (!state.chatId) return;
  ui.deleteName.textContent = ui.title.textContent;
  ui.deleteError.hidden = true;
  ui.deleteDialog.showModal();
}

async function deleteChat(event) {
  event.preventDefault();
  const chatId = state.chatId;
  if (!chatId) return;
  try {
    await api(`/chat/${chatId}`, { method: "DELETE" });
  } catch (error) {
    if (error.status !== 404) {
      ui.deleteError.textContent = error.message;
      ui.deleteError.hidden = false;
      return;
    }
  }
  ui.deleteDialog.close();
  if (chatId === state.chatId) newDraft();
  refreshChats();
}

/** Loads the page before the oldest message shown; false if that failed. */
async function loadOlder() {
  if (!state.chatId || state.oldestSeq == null) return false;
  const view = state.view;
  ui.loadOlder.disabled = true;
  try {
    const page = await api(`/chat/${state.chatId}?limit=${PAGE_SIZE}&before_seq=${state.oldestSeq}`);
    if (view !== state.view) return false;
    const box = ui.messages;
    const fromBottom = box.scrollHeight - box.scrollTop;
    for (const message of page.messages) renderMessage(message);
    box.scrollTop = box.scrollHeight - fromBottom;
    ui.loadOlder.hidden = !page.has_more;
    return true;
  } catch (error) {
    showAlert(error.message);
    return false;
  } finally {
    ui.loadOlder.disabled = false;
  }
}

let chatsRequest = 0;

async function refreshChats() {
  if (!state.token) return;
  const request = ++chatsRequest;
  const q = ui.search.value.trim();
  try {
    const page = await api(q ? `/chats?q=${encodeURIComponent(q)}&limit=50` : "/chats?limit=50");
    if (request === chatsRequest) renderChats(page.chats, q);
  } catch (error) {
    if (error.status !== 401) showAlert(`Could not load your chats: ${error.message}`);
  }
}

function renderChats(chats, q) {
  ui.chatList.replaceChildren(...chats.map((chat) => {
    const item = el("li");
    const button = el("button");
    button.type = "button";
    button.dataset.chatId = chat.id;
    const count = `${chat.message_count} message${chat.message_count === 1 ? "" : "s"}`;
    button.append(el("span", "chat-name", chat.title),
      el("span", "chat-meta", `${count} · ${formatWhen(chat.updated_at)}`));
    const snippets = chat.snippets || [];
    // while searching, the chat opens at its best hit
    button.addEventListener("click", () => (snippets.length
      ? jumpTo(chat.id, snippets[0].seq) : openChat(chat.id)));
    item.append(button);
    for (const hit of snippets) item.append(snippetLink(chat.id, hit));
    if (chat.id === state.chatId) ui.title.textContent = chat.title;
    return item;
  }));
  ui.chatListEmpty.hidden = chats.length > 0;
  ui.chatListEmpty.textContent = q ? "No chat matches." : "No chats yet.";
  markSelected();
}

/** A search hit: the matching words marked, a link to the message. */
function snippetLink(chatId, hit) {
  const link = el("a", "chat-snippet");
  link.href = `#${chatId}`;
  link.dataset.seq = String(hit.seq);
  link.title = `Go to this ${hit.role === "user" ? "message" : "reply"}`;
  link.append(...snippetNodes(hit.snippet));
  link.addEventListener("click", (event) => {
    event.preventDefault();
    jumpTo(chatId, hit.seq);
  });
  return link;
}

/** The shown message `seq`, loading older pages to reach it; null if the branch shown does
 * not hold it, undefined if the chat was left meanwhile. */
async function findShown(seq) {
  const view = state.view;
  const find = () => ui.list.querySelector(`.message[data-seq="${Number(seq)}"]`);
  for (let pages = 0; !find() && !ui.loadOlder.hidden && pages < JUMP_MAX_PAGES; pages += 1) {
    if (!(await loadOlder()) || view !== state.view) return undefined;
  }
  return find();
}

/** Opens a chat at message `seq` (on its branch), loading older pages until it is there,
 * and highlights it. */
async function jumpTo(chatId, seq) {
  if (state.chatId !== chatId) await openChat(chatId);
  else {
    closeSidebar();
    await state.opening;
  }
  let node = await findShown(seq);
  if (node === undefined) return;
  if (!node) { // on another branch of the chat: make it the active one, then look again
    try {
      await api(`/chat/${chatId}/branch`, { method: "POST", body: { seq: Number(seq) } });
      await loadChat(chatId, { push: false });
      node = await findShown(seq);
    } catch (error) {
      if (error.status !== 400) { showAlert(error.message); return; }
    }
  }
  if (node === undefined) return;
  if (!node) { showAlert("That message is no longer in this chat."); return; }
  node.scrollIntoView({ block: "center" });
  node.tabIndex = -1;
  node.focus({ preventScroll: true });
  node.classList.remove("hit");
  void node.offsetWidth; // restart the highlight when the same message is hit again
  node.classList.add("hit");
  clearTimeout(node.hitTimer);
  node.hitTimer = setTimeout(() => node.classList.remove("hit"), HIT_HIGHLIGHT_MS);
}

function markSelected() {
  for (const button of ui.chatList.querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button.dataset.chatId === state.chatId));
  }
}

// -- sending -----------------------------------------------------------------------------

function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // crypto.randomUUID needs a secure context; plain http on a LAN address is not one
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A draft becomes a chat on its first message (titled after it). */
async function ensureChat(text) {
  if (state.chatId) return state.chatId;
  if (!state.creating) {
    state.creating = api("/chat", { method: "POST", body: { title: shortTitle(text) } })
      .finally(() => { state.creating = null; });
  }
  const chat = await state.creating;
  if (state.chatId !== chat.id) {
    clearChatView();
    state.chatId = chat.id;
    state.loaded = true;
    history.pushState(null, "", `#${chat.id}`);
    ui.title.textContent = chat.title;
    ui.chatActions.hidden = false;
    subscribe();
  }
  return chat.id;
}

async function sendMessage(text) {
  let chatId;
  try {
    chatId = await ensureChat(text);
  } catch (error) {
    showAlert(`Could not start a chat: ${error.message}`);
    return false;
  }
  const clientId = newClientId();
  const node = renderUserMessage({ content: text }, clientId);
  state.outbox.set(clientId, { chatId, message: text, el: node });
  wsSend({ event: "user_message", chat_id: chatId, message: text, client_message_id: clientId });
  scrollToBottom();
  refreshChats();
  return true;
}

async function submitComposer(event) {
  event.preventDefault();
  const text = ui.input.value;
  if (!text.trim()) return;
  ui.input.value = "";
  if (state.editing != null) { // the edited message and its answer replace the branch shown
    wsSend({ event: "edit", chat_id: state.chatId, seq: state.editing, message: text,
      client_message_id: newClientId() });
    stopEditing();
    return;
  }
  if (!(await sendMessage(text))) ui.input.value = text;
  ui.input.focus();
}

async function stopResponse() {
  if (!state.chatId) return;
  if (wsSend({ event: "stop", chat_id: state.chatId })) return;
  try {
    await api(`/chat/${state.chatId}/stop`, { method: "POST" });
  } catch (error) {
    showAlert(error.message);
  }
}

// -- stats -------------------------------------------------------------------------------

async function loadStats() {
  try {
    const stats = await api("/stats");
    const t = stats.totals;
    const rows = [
      ["Chats", [t.chats]], ["Messages", [t.messages]],
      ["Responses", [t.responses, `${number(t.failed_responses)} failed`]],
      ["Tokens", [t.total_tokens, `${number(t.prompt_tokens)} in`, `${number(t.completion_tokens)} out`]],
      ["Tool calls", [t.tool_calls, plural(t.tool_errors, "error")]],
      ["Latency", [`p50 ${formatMs(stats.latency_ms.p50)}`, `p95 ${formatMs(stats.latency_ms.p95)}`]],
      ["TTFT", [`p50 ${formatMs(stats.ttft_ms.p50)}`, `p95 ${formatMs(stats.ttft_ms.p95)}`]],
      ["Tokens/s", [`p50 ${decimal(stats.tokens_per_second.p50)}`,
        `mean ${decimal(stats.tokens_per_second.mean)}`]],
      ["Live", [plural(stats.live.connections, "connection"),
        `${number(stats.live.generating)} generating`]],
    ];
    const models = Object.entries(stats.models || {}).map(([name, m]) => [name, [
      plural(m.responses, "response"), plural(m.total_tokens, "token"),
      `TTFT p50 ${formatMs(m.ttft_ms && m.ttft_ms.p50)}`]]);
    const tools = Object.entries(stats.tools || {}).map(([name, x]) => [name, [
      plural(x.calls, "call"), plural(x.errors, "error"),
      `mean ${formatMs(x.mean_duration_ms)}`]]);
    ui.statsBody.replaceChildren(
      statsGroup(null, rows),
      ...(models.length ? [statsGroup("Models", models)] : []),
      ...(tools.length ? [statsGroup("Tools", tools)] : []));
  } catch (error) {
    ui.statsBody.replaceChildren(el("p", "error-text", `Stats unavailable: ${error.message}`));
  }
}

/**
 * A titled list of figures. Each value is made of parts that never break inside, so that a
 * narrow panel wraps a row between its parts, and under its name only when it must.
 */
function statsGroup(title, rows) {
  const group = el("section", "stats-group");
  if (title) group.append(el("h3", null, title));
  const list = el("dl");
  for (const [name, parts] of rows) {
    const row = el("div", "stat");
    const label = el("dt", null, name);
    label.title = name;
    const value = el("dd");
    value.append(...parts.map((part, i) => el("span", null, (i ? " · " : "")
      + (typeof part === "number" || part == null ? number(part) : part))));
    row.append(label, value);
    list.append(row);
  }
  group.append(list);
  return group;
}

function number(value) {
  return value == null ? "–" : Number(value).toLocaleString();
}

function plural(value, word) {
  return `${number(value)} ${word}${value === 1 ? "" : "s"}`;
}

function decimal(value) {
  return value == null ? "–" : Number(value).toFixed(1);
}

// -- layout ------------------------------------------------------------------------------

function closeSidebar() {
  const wasOpen = ui.layout.dataset.sidebar === "open";
  ui.layout.dataset.sidebar = "closed";
  ui.toggleSidebar.setAttribute("aria-expanded", "false");
  // the panel slides away: the focus must not stay in it (the messages, not the message box,
  // whose focus would open a phone's keyboard)
  if (wasOpen && ui.sidebar.contains(document.activeElement)) ui.messages.focus({ preventScroll: true });
}

function toggleSidebar() {
  const open = ui.layout.dataset.sidebar !== "open";
  ui.layout.dataset.sidebar = open ? "open" : "closed";
  ui.toggleSidebar.setAttribute("aria-expanded", String(open));
  if (open) ui.search.focus();
}

function chatFromHash() {
  const id = decodeURIComponent(location.hash.slice(1));
  return /^[0-9a-f-]{36}$/i.test(id) ? id : null;
}

// -- keyboard ----------------------------------------------------------------------------

/** A touch screen's keyboard has no Shift+Enter to speak of: there Enter is a new line. */
const touchTyping = matchMedia("(pointer: coarse)");
const onMac = /Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent);

function enterSends() {
  return !touchTyping.matches;
}

function describeComposer() {
  const mod = onMac ? "⌘" : "Ctrl";
  ui.input.placeholder = enterSends()
    ? "Message (Enter to send, Shift+Enter for a new line)"
    : `Message (Send button or ${mod}+Enter to send)`;
  ui.input.setAttribute("enterkeyhint", enterSends() ? "send" : "enter");
  for (const key of document.querySelectorAll("kbd[data-mod]")) key.textContent = mod;
}

function onComposerKey(event) {
  if (event.key !== "Enter" || event.isComposing) return;
  const always = event.ctrlKey || event.metaKey;
  if (always || (enterSends() && !event.shiftKey && !event.altKey)) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
}

function typingIn(target) {
  return target instanceof HTMLElement
    && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
}

/** The page's shortcuts, listed in its "Keyboard shortcuts" panel (index.html). */
function onShortcut(event) {
  if (event.defaultPrevented || event.isComposing || ui.tokenDialog.open) return;
  const mod = event.ctrlKey || event.metaKey;
  const newChat = (mod && event.shiftKey && event.code === "KeyO")
    || (event.altKey && !mod && !event.shiftKey && event.code === "KeyN");
  if (newChat) {
    event.preventDefault();
    newDraft();
  } else if ((mod && !event.shiftKey && event.key.toLowerCase() === "k")
      || (event.key === "/" && !mod && !event.altKey && !typingIn(event.target))) {
    event.preventDefault();
    focusSearch();
  } else if (event.key === "Escape" && event.shiftKey) {
    event.preventDefault();
    ui.input.focus();
  } else if (event.key === "Escape") {
    onEscape(event);
  } else if (event.key === "?" && !typingIn(event.target)) {
    event.preventDefault();
    ui.shortcuts.open = !ui.shortcuts.open;
  }
}

/** Esc closes what is open (shortcuts, the chat panel), else stops the reply. */
function onEscape(event) {
  if (ui.shortcuts.open) {
    ui.shortcuts.open = false;
    ui.shortcuts.querySelector("summary").focus();
  } else if (ui.layout.dataset.sidebar === "open") {
    closeSidebar();
    ui.toggleSidebar.focus();
  } else if (!ui.stop.hidden) {
    stopResponse();
  } else if (state.editing != null) {
    stopEditing();
    ui.input.value = "";
  } else {
    return;
  }
  event.preventDefault();
}

function focusSearch() {
  if (getComputedStyle(ui.toggleSidebar).display !== "none" && ui.layout.dataset.sidebar !== "open") {
    toggleSidebar();
  }
  ui.search.focus();
  ui.search.select();
}

function wire() {
  let searchTimer = null;
  ui.composer.addEventListener("submit", submitComposer);
  ui.input.addEventListener("keydown", onComposerKey);
  describeComposer();
  touchTyping.addEventListener("change", describeComposer);
  document.addEventListener("keydown", onShortcut);
  // the skip link must not change the address: its #hash names the open chat
  document.querySelector(".skip").addEventListener("click", (event) => {
    event.preventDefault();
    ui.input.focus();
  });
  ui.list.addEventListener("click", (event) => {
    const copy = event.target.closest("button.copy");
    if (copy) copyCode(copy);
  });
  ui.stop.addEventListener("click", stopResponse);
  ui.newChat.addEventListener("click", newDraft);
  ui.loadOlder.addEventListener("click", loadOlder);
  ui.search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(refreshChats, SEARCH_DELAY_MS);
  });
  ui.searchForm.addEventListener("submit", (event) => { event.preventDefault(); refreshChats(); });
  ui.stats.addEventListener("toggle", () => { if (ui.stats.open) loadStats(); });
  ui.statsRefresh.addEventListener("click", loadStats);
  ui.toggleSidebar.addEventListener("click", toggleSidebar);
  ui.alertClose.addEventListener("click", () => { ui.alert.hidden = true; });
  window.addEventListener("popstate", () => {
    const id = chatFromHash();
    if (id && id !== state.chatId) openChat(id, { push: false });
    else if (!id && state.chatId) newDraft();
  });
  window.addEventListener("online", () => { if (!state.ws) { state.attempts = 0; connect(); } });
  ui.renameChat.addEventListener("click", askRename);
  $("replay-chat").addEventListener("click", () => {
    if (state.chatId) player.open(state.chatId).catch((error) => showAlert(error.message));
  });
  for (const button of document.querySelectorAll("[data-export]")) {
    button.addEventListener("click", () => {
      $("export-menu").open = false;
      download(state.chatId, button.dataset.export, state.token)
        .catch((error) => showAlert(error.message));
    });
  }
  ui.deleteChat.addEventListener("click", askDelete);
  ui.renameForm.addEventListener("submit", rename);
  ui.deleteForm.addEventListener("submit", deleteChat);
  for (const button of document.querySelectorAll("dialog [data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
  ui.tokenDialog.addEventListener("cancel", (event) => event.preventDefault());
  ui.tokenForm.addEventListener("submit", () => {
    state.token = ui.tokenInput.value.trim();
    ui.tokenInput.value = "";
    storage("set", state.token);
    start();
  });
}

function start() {
  connect();
  refreshChats();
  const id = chatFromHash();
  if (id) openChat(id, { push: false });
  else newDraft();
}

wire();
state.token = takeToken();
if (state.token) start();
else askForToken("");
