// The replay player: a chat as it streamed (the `replay` frames, marked `replay: true`), and
// as it was at any seq (`GET /chat/{id}?at_seq=N`), in a panel of its own, apart from the
// live chat view. The scrubber moves by seq; play replays from the scrubber's seq at the
// chosen speed; pause sends `replay_stop`. Also the export downloads.
//
// Everything shown is text (textContent): a replayed reply is shown as it was sent, raw.

import { codePointCount, placeDelta } from "./text.js";

const $ = (id) => document.getElementById(id);

export function createPlayer({ api, send }) {
  const ui = {
    panel: $("player"), close: $("player-close"), play: $("player-play"),
    speed: $("player-speed"), scrub: $("player-scrub"), at: $("player-at"),
    screen: $("player-screen"),
  };
  const me = { chatId: null, events: [], playing: false, view: 0, replies: new Map() };

  function eventAt(seq) { return me.events[seq - 1]; }

  function setPosition(seq) {
    ui.scrub.value = String(seq);
    const event = eventAt(seq);
    ui.at.textContent = seq === 0 ? `seq 0 of ${me.events.length}: before the chat`
      : `seq ${seq} of ${me.events.length}: ${event ? event.type : ""}`;
  }

  function setPlaying(playing) {
    me.playing = playing;
    ui.play.textContent = playing ? "Pause" : "Play";
    ui.play.setAttribute("aria-pressed", String(playing));
    ui.panel.dataset.playing = String(playing);
  }

  function messageNode(key, role, header) {
    let node = ui.screen.querySelector(`[data-key="${CSS.escape(key)}"]`);
    if (!node) {
      node = document.createElement("li");
      node.className = `player-message ${role}`;
      node.dataset.key = key;
      const head = document.createElement("div");
      head.className = "player-head";
      const tools = document.createElement("ul");
      tools.className = "player-tools";
      const text = document.createElement("div");
      text.className = "player-text";
      node.append(head, tools, text);
      ui.screen.append(node);
    }
    node.querySelector(".player-head").textContent = header;
    return node;
  }

  function toolLine(node, call) {
    let line = node.querySelector(`[data-call="${CSS.escape(call.call_id)}"]`);
    if (!line) {
      line = document.createElement("li");
      line.dataset.call = call.call_id;
      node.querySelector(".player-tools").append(line);
    }
    const outcome = call.error != null ? ` ✗ ${call.error}`
      : call.result !== undefined && call.result !== null ? ` → ${JSON.stringify(call.result)}` : " …";
    line.textContent = `⚙ ${call.tool}(${JSON.stringify(call.arguments ?? {})})${outcome}`;
  }

  function showMessage(m) {
    if (m.role === "user") {
      messageNode(`u${m.seq}`, "user", `seq ${m.seq} · user`)
        .querySelector(".player-text").textContent = m.content;
      return;
    }
    const node = reply(m.response_id, m.seq, m.model);
    node.dataset.status = m.status;
    node.querySelector(".player-head").textContent = replyHeader(m.seq, m.model, m.status);
    for (const call of m.tool_calls || []) toolLine(node, call);
    const state = me.replies.get(m.response_id);
    if (codePointCount(state.text) <= codePointCount(m.content)) {
      state.text = m.content;
      node.querySelector(".player-text").textContent = m.content;
    }
  }

  function replyHeader(seq, model, status) {
    return `seq ${seq} · assistant${model ? ` · ${model}` : ""} · ${status}`;
  }

  function reply(responseId, seq, model) {
    if (!me.replies.has(responseId)) me.replies.set(responseId, { text: "" });
    return messageNode(`r${responseId}`, "assistant", replyHeader(seq, model, "streaming"));
  }

  /** The reply a replayed frame belongs to, its question shown first (from the log). */
  function replyOf(responseId) {
    if (!me.replies.has(responseId)) {
      const started = me.events.find(
        (e) => e.type === "ResponseStarted" && e.data.response_id === responseId);
      if (started) {
        const asked = eventAt(started.data.reply_to_seq);
        if (asked && asked.type === "MessageReceived") {
          showMessage({ seq: asked.seq, role: "user", content: asked.data.text });
        }
        setPosition(started.seq);
        return reply(responseId, started.seq, started.data.model);
      }
      return reply(responseId, "?", null);
    }
    return ui.screen.querySelector(`[data-key="${CSS.escape(`r${responseId}`)}"]`);
  }

  async function showAt(seq) {
    const view = ++me.view;
    me.replies.clear();
    ui.screen.replaceChildren();
    setPosition(seq);
    if (seq === 0) return;
    const page = await api(`/chat/${me.chatId}?at_seq=${seq}&limit=500`);
    if (view !== me.view) return;
    for (const m of page.messages) showMessage(m);
  }

  async function loadEvents(chatId) {
    const events = [];
    let after = 0;
    for (let pages = 0; pages < 50; pages += 1) {
      const page = await api(`/chat/${chatId}/events?after_seq=${after}&limit=1000`);
      events.push(...page.events);
      if (page.events.length < 1000) break;
      after = page.next_after_seq;
    }
    return events;
  }

  async function open(chatId) {
    stop();
    me.chatId = chatId;
    ui.panel.hidden = false;
    me.events = await loadEvents(chatId);
    ui.scrub.max = String(me.events.length);
    await showAt(me.events.length);
  }

  function close() {
    stop();
    me.chatId = null;
    ui.panel.hidden = true;
  }

  function stop() {
    if (me.playing && me.chatId) send({ event: "replay_stop", chat_id: me.chatId });
    setPlaying(false);
  }

  async function play() {
    if (me.playing) return stop();
    let from = Number(ui.scrub.value);
    if (from >= me.events.length) from = 0; // at the end: from the start
    await showAt(from);
    setPlaying(send({ event: "replay", chat_id: me.chatId, from_seq: from,
      speed: Number(ui.speed.value) }));
  }

  /** A frame marked `replay: true` (and `replay_done`). */
  function onFrame(frame) {
    if (frame.chat_id !== me.chatId || !me.playing) return;
    if (frame.event === "replay_done") {
      setPosition(frame.last_seq);
      setPlaying(false);
    } else if (frame.event === "ai_response" && !frame.done) {
      const node = replyOf(frame.response_id);
      const state = me.replies.get(frame.response_id);
      const placed = placeDelta(state.text, codePointCount(state.text), frame.offset, frame.delta);
      if (placed) state.text = placed.text;
      node.querySelector(".player-text").textContent = state.text;
    } else if (frame.event === "ai_response") {
      const node = replyOf(frame.response_id);
      node.dataset.status = frame.status;
      node.querySelector(".player-head").textContent = node.querySelector(".player-head")
        .textContent.replace(/streaming$/, frame.status);
      setPosition(frame.seq);
    } else if (frame.event === "tool_activity") {
      toolLine(replyOf(frame.response_id), frame);
    } else if (frame.event === "chat_history") {
      for (const m of frame.messages) showMessage(m);
      setPosition(frame.last_seq);
    }
    ui.screen.lastElementChild?.scrollIntoView({ block: "end" });
  }

  ui.close.addEventListener("click", close);
  ui.play.addEventListener("click", play);
  ui.scrub.addEventListener("input", () => { stop(); showAt(Number(ui.scrub.value)); });
  ui.speed.addEventListener("change", () => { if (me.playing) { stop(); play(); } });
  /** The connection closed: a replay running on it is over (nothing to stop). */
  function halt() { setPlaying(false); }

  return { open, close, halt, onFrame, chatId: () => me.chatId };
}

/** Downloads the chat's export in `format` (jsonl, openai, markdown). */
export async function download(chatId, format, token) {
  const response = await fetch(`/chat/${chatId}/export?format=${format}`,
    { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) throw new Error(`export failed: HTTP ${response.status}`);
  const name = (response.headers.get("Content-Disposition") || "").match(/filename="(.+)"/);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = name ? name[1] : `chat-${chatId}.${format}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
