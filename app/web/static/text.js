// Text measured the way the wire contract measures it: in Unicode code points (Python's
// `len`), not in UTF-16 code units (JavaScript's `length`). An emoji such as 😀 or a
// mathematical letter such as 𝔘 is one code point and two UTF-16 units.

/** The number of code points in `text`. */
export function codePointCount(text) {
  let count = 0;
  for (let i = 0; i < text.length; i += 1) {
    const unit = text.charCodeAt(i);
    // a high surrogate followed by a low one is a single code point
    if (unit >= 0xd800 && unit <= 0xdbff && i + 1 < text.length) {
      const next = text.charCodeAt(i + 1);
      if (next >= 0xdc00 && next <= 0xdfff) i += 1;
    }
    count += 1;
  }
  return count;
}

/**
 * The UTF-16 index in `text` where code point number `offset` starts (`text.length` at or
 * past the end). `total`, the code point count of `text` when the caller knows it, lets an
 * offset near the end be found by walking back from the end: streamed text is placed there.
 */
export function codePointIndex(text, offset, total = null) {
  if (offset <= 0) return 0;
  if (total !== null && offset >= total) return text.length;
  if (total !== null && offset > total / 2) {
    let index = text.length;
    for (let back = total - offset; back > 0; back -= 1) {
      index -= 1;
      const unit = text.charCodeAt(index);
      if (unit >= 0xdc00 && unit <= 0xdfff && index > 0) {
        const prev = text.charCodeAt(index - 1);
        if (prev >= 0xd800 && prev <= 0xdbff) index -= 1;
      }
    }
    return index;
  }
  let index = 0;
  for (let seen = 0; seen < offset && index < text.length; seen += 1) {
    const unit = text.charCodeAt(index);
    index += unit >= 0xd800 && unit <= 0xdbff && isLow(text.charCodeAt(index + 1)) ? 2 : 1;
  }
  return index;
}

function isLow(unit) {
  return unit >= 0xdc00 && unit <= 0xdfff;
}

/**
 * Places `delta` at code point `offset` of `text` (whose code point count is `total`), as a
 * streamed `ai_response` frame asks. Returns the new text and its count, or null when text is
 * missing before `offset` (the caller must fetch the reply again).
 */
export function placeDelta(text, total, offset, delta) {
  if (offset > total) return null;
  const deltaCount = codePointCount(delta);
  if (offset === total) return { text: text + delta, total: total + deltaCount };
  const start = codePointIndex(text, offset, total);
  const after = start + codePointIndex(text.slice(start), deltaCount);
  return {
    text: text.slice(0, start) + delta + text.slice(after),
    total: Math.max(total, offset + deltaCount),
  };
}

const graphemes = typeof Intl !== "undefined" && Intl.Segmenter
  ? new Intl.Segmenter(undefined, { granularity: "grapheme" }) : null;

/**
 * The first line of `text`, cut to at most `max` code points without splitting a character
 * (nor, where the browser can tell, an emoji sequence such as 👩‍👩‍👧), with "…" when cut.
 */
export function shortTitle(text, max = 60) {
  const line = text.trim().split("\n")[0].trim();
  if (codePointCount(line) <= max) return line;
  const pieces = graphemes ? Array.from(graphemes.segment(line), (s) => s.segment)
    : Array.from(line);
  let title = "";
  let used = 0;
  for (const piece of pieces) {
    const size = codePointCount(piece);
    if (used + size > max - 1) break;
    title += piece;
    used += size;
  }
  return `${title.trimEnd()}…`;
}
