// A small markdown renderer that cannot inject markup: it never parses text as HTML. Blocks and inline
// spans are found in the plain text, and every piece of text goes into the page as a text node; the only
// elements are the ones created here, and the only attribute taken from the text is a link's http(s) URL.
// Handles fenced code blocks, headings, lists, quotes, paragraphs, `code`, **bold**, *italic* and
// [links](https://...); anything else shows as the text it is.

export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)/);
    if (fence) {
      // Up to the closing fence; while a reply streams, an open fence runs to the end.
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      i++;
      fragment.append(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      fragment.append(element(`h${Math.min(heading[1].length + 2, 6)}`, inline(heading[2])));
      i++;
      continue;
    }
    const listItem = /^\s*(?:[-*+]|\d+[.)])\s+/;
    if (listItem.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      for (; i < lines.length && listItem.test(lines[i]); i++) {
        list.append(element("li", inline(lines[i].replace(listItem, ""))));
      }
      fragment.append(list);
      continue;
    }
    if (line.startsWith(">")) {
      const quoted = [];
      for (; i < lines.length && lines[i].startsWith(">"); i++) quoted.push(lines[i].replace(/^>\s?/, ""));
      fragment.append(element("blockquote", renderMarkdown(quoted.join("\n"))));
      continue;
    }
    const paragraph = [];
    for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) paragraph.push(lines[i]);
    fragment.append(element("p", inline(paragraph.join("\n"))));
  }
  return fragment;
}

function startsBlock(line) {
  return /^\s*(```|~~~)|^#{1,6}\s|^\s*(?:[-*+]|\d+[.)])\s+|^>/.test(line);
}

function element(tag, ...children) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

function codeBlock(code, language) {
  const pre = document.createElement("pre");
  const codeNode = element("code", code); // a string given to append() becomes a text node
  if (language) codeNode.dataset.language = language;
  const copy = element("button", "Copy");
  copy.type = "button";
  copy.className = "copy";
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(code);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => (copy.textContent = "Copy"), 1500);
  });
  pre.append(copy, codeNode);
  return pre;
}

// `code` first (nothing inside it is formatted), then links, bold and italic.
const INLINE = new RegExp(
  [
    /(?<ticks>`+)(?<code>[^`]|[^`][\s\S]*?[^`])\k<ticks>(?!`)/.source,
    /\[(?<label>[^\]\n]+)\]\((?<url>[^)\s]+)\)/.source,
    /\*\*(?=\S)(?<bold>[\s\S]*?\S)\*\*/.source,
    /(?<![\w*])(?<mark>[*_])(?=\S)(?<italic>[^*_\n]*?\S)\k<mark>(?![\w*])/.source,
  ].join("|"),
  "g",
);

function inline(text) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    fragment.append(text.slice(last, m.index));
    last = m.index + m[0].length;
    const { code, label, url, bold, italic } = m.groups;
    if (code !== undefined) fragment.append(element("code", code));
    else if (label !== undefined) fragment.append(link(label, url, m[0]));
    else if (bold !== undefined) fragment.append(element("strong", inline(bold)));
    else fragment.append(element("em", inline(italic)));
  }
  fragment.append(text.slice(last));
  return fragment;
}

// Only http(s) URLs become links, opened without access to this page; any other scheme (javascript:,
// data:) stays as its literal text.
function link(label, url, literal) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    return literal;
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") return literal;
  const a = element("a", inline(label));
  a.href = parsed.href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}
