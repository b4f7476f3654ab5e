// Markdown of replies, made safe: `marked` parses it, raw HTML in the text is shown as text
// (never as markup), DOMPurify keeps only what markdown produces, highlight.js colours code.
// A reply is rendered again as it streams; the blocks that did not change are kept as they
// are (a code block's copy button stays usable while the text below it grows).

import DOMPurify from "./vendor/dompurify/purify.es.js";
import hljs from "./vendor/highlight/core.min.js";
import bash from "./vendor/highlight/languages/bash.min.js";
import c from "./vendor/highlight/languages/c.min.js";
import cpp from "./vendor/highlight/languages/cpp.min.js";
import css from "./vendor/highlight/languages/css.min.js";
import diff from "./vendor/highlight/languages/diff.min.js";
import dockerfile from "./vendor/highlight/languages/dockerfile.min.js";
import go from "./vendor/highlight/languages/go.min.js";
import ini from "./vendor/highlight/languages/ini.min.js";
import java from "./vendor/highlight/languages/java.min.js";
import javascript from "./vendor/highlight/languages/javascript.min.js";
import json from "./vendor/highlight/languages/json.min.js";
import markdown from "./vendor/highlight/languages/markdown.min.js";
import plaintext from "./vendor/highlight/languages/plaintext.min.js";
import python from "./vendor/highlight/languages/python.min.js";
import rust from "./vendor/highlight/languages/rust.min.js";
import shell from "./vendor/highlight/languages/shell.min.js";
import sql from "./vendor/highlight/languages/sql.min.js";
import typescript from "./vendor/highlight/languages/typescript.min.js";
import xml from "./vendor/highlight/languages/xml.min.js";
import yaml from "./vendor/highlight/languages/yaml.min.js";
import { Marked } from "./vendor/marked/marked.esm.js";

const LANGUAGES = {
  bash, c, cpp, css, diff, dockerfile, go, ini, java, javascript, json, markdown, plaintext,
  python, rust, shell, sql, typescript, xml, yaml,
};
for (const [name, grammar] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, grammar);

/** Code blocks longer than this are shown uncoloured (colouring is linear, but not cheap). */
const HIGHLIGHT_MAX_CHARS = 100_000;
/** Guessing the language of an unlabelled block tries every grammar: only when it is final. */
const AUTODETECT_MAX_CHARS = 20_000;
const HIGHLIGHT_CACHE_SIZE = 64;

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (ch) => ESCAPES[ch]);

const highlighted = new Map(); // "lang\0code" -> HTML, the most recent last
let guessLanguages = false; // set for the final rendering of a reply

function highlight(code, language) {
  if (code.length > HIGHLIGHT_MAX_CHARS) return escapeHtml(code);
  const known = language && hljs.getLanguage(language);
  const guess = !language && guessLanguages && code.length <= AUTODETECT_MAX_CHARS;
  if (!known && !guess) return escapeHtml(code);
  const key = `${known ? language : "?"}\0${code}`;
  let html = highlighted.get(key);
  if (html === undefined) {
    html = known ? hljs.highlight(code, { language, ignoreIllegals: true }).value
      : hljs.highlightAuto(code).value;
    if (highlighted.size >= HIGHLIGHT_CACHE_SIZE) highlighted.delete(highlighted.keys().next().value);
  } else {
    highlighted.delete(key);
  }
  highlighted.set(key, html);
  return html;
}

const marked = new Marked({
  gfm: true,
  breaks: true, // a model's single line breaks are meant as line breaks
  renderer: {
    // HTML in a reply is text the model wrote, shown as such: never markup of the page
    html({ text, block }) {
      return block ? `<p>${escapeHtml(text.trim())}</p>\n` : escapeHtml(text);
    },
    code({ text, lang }) {
      const language = ((lang || "").match(/^\S*/)[0] || "").toLowerCase();
      const label = language ? ` language-${escapeHtml(language)}` : "";
      return `<pre><code class="hljs${label}">${highlight(text, language)}</code></pre>\n`;
    },
    // remote images would be fetched from wherever the model points (and the page's policy
    // refuses them anyway): a link to the image instead
    image({ href, text }) {
      return `<a href="${escapeHtml(href || "")}">${escapeHtml(text || href || "image")}</a>`;
    },
  },
});

const SANITIZE = {
  ALLOWED_TAGS: [
    "a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
    "i", "input", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "sup", "table", "tbody",
    "td", "th", "thead", "tr", "ul",
  ],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start", "type", "checked", "disabled"],
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
  if (node.tagName === "INPUT") { // task list boxes only, read-only
    if (node.getAttribute("type") !== "checkbox") node.remove();
    else node.setAttribute("disabled", "");
  }
  if (node.hasAttribute && node.hasAttribute("class")) {
    const kept = node.getAttribute("class").split(/\s+/)
      .filter((name) => /^(hljs[\w-]*|language-[\w+#.-]+)$/.test(name));
    if (kept.length) node.setAttribute("class", kept.join(" "));
    else node.removeAttribute("class");
  }
});

const KEY = Symbol("rendered source");

/**
 * Shows `text` (markdown) in `container`, replacing only the top-level blocks that changed.
 * `final`: the text is complete (unlabelled code blocks then get their language guessed).
 */
export function renderMarkdown(container, text, { final = false } = {}) {
  guessLanguages = final;
  let fragment;
  try {
    fragment = DOMPurify.sanitize(marked.parse(text), SANITIZE);
  } finally {
    guessLanguages = false;
  }
  const fresh = [...fragment.childNodes].filter(
    (node) => node.nodeType === Node.ELEMENT_NODE || node.textContent.trim());
  const old = [...container.childNodes];
  fresh.forEach((node, i) => {
    const key = node.nodeType === Node.ELEMENT_NODE ? node.outerHTML : node.textContent;
    if (old[i] && old[i][KEY] === key) return;
    const shown = decorate(node);
    shown[KEY] = key;
    if (old[i]) container.replaceChild(shown, old[i]);
    else container.append(shown);
  });
  for (const node of old.slice(fresh.length)) node.remove();
}

/** Code blocks get a bar with their language and a copy button; returns what to insert. */
function decorate(node) {
  if (node.nodeType !== Node.ELEMENT_NODE) return node;
  const blocks = node.tagName === "PRE" ? [node] : [...node.querySelectorAll("pre")];
  let top = node;
  for (const pre of blocks) {
    const code = pre.querySelector("code");
    const language = [...(code ? code.classList : [])]
      .find((name) => name.startsWith("language-"));
    const box = document.createElement("div");
    box.className = "code-block";
    const bar = document.createElement("div");
    bar.className = "code-bar";
    const label = document.createElement("span");
    label.className = "code-lang";
    // shown by the style sheet, so that the reply's text stays the model's text
    label.dataset.lang = language ? language.slice("language-".length) : "code";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.setAttribute("aria-label", "Copy code");
    bar.append(label, copy);
    if (pre === node) top = box;
    else pre.replaceWith(box);
    box.append(bar, pre);
  }
  return top;
}

/** A click on a code block's copy button (delegated from the message list). */
export async function copyCode(button) {
  const pre = button.closest(".code-block").querySelector("pre");
  const done = await copyText(pre.textContent);
  button.dataset.copied = done ? "yes" : "no";
  button.setAttribute("aria-label", done ? "Copied" : "Copy failed: select the code to copy it");
  clearTimeout(button.copyTimer);
  button.copyTimer = setTimeout(() => {
    delete button.dataset.copied;
    button.setAttribute("aria-label", "Copy code");
  }, 2000);
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch { /* refused (no permission, no focus): try the old way */ }
  }
  // plain http on a LAN address is no secure context: no navigator.clipboard there
  const active = document.activeElement;
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  let done = false;
  try { done = document.execCommand("copy"); } catch { done = false; }
  area.remove();
  if (active && active.focus) active.focus();
  return done;
}

/**
 * A search snippet as nodes: the server marks each hit as `**hit**`; hits become <mark>,
 * everything else stays text.
 */
export function snippetNodes(snippet) {
  const parts = snippet.split("**");
  if (parts.length % 2 === 0) { // an unpaired marker is text
    const last = parts.pop();
    parts[parts.length - 1] += `**${last}`;
  }
  return parts.flatMap((part, i) => {
    if (!part) return [];
    if (i % 2 === 0) return [document.createTextNode(part)];
    const mark = document.createElement("mark");
    mark.textContent = part;
    return [mark];
  });
}
