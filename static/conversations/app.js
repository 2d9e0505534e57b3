// Progressive enhancement for the chat pages. Every page works without this file: forms post
// and the server answers with a redirect. With it, replies stream in token by token through the
// REST API (Server-Sent Events), and a Stop button ends a reply early.
"use strict";

const PENDING_KEY = "chat:pending:";

function csrfToken() {
  const input = document.querySelector("input[name=csrfmiddlewaretoken]");
  return input ? input.value : "";
}

function postJSON(url, body, accept = "application/json") {
  return fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: {
      "Content-Type": "application/json",
      Accept: accept,
      "X-CSRFToken": csrfToken(),
    },
    body: JSON.stringify(body),
  });
}

// Server-Sent Events from a fetch() response: yields {kind, data}.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { kind, data: data ? JSON.parse(data) : null };
    }
  }
}

function showError(text) {
  let flash = document.querySelector("ul.flash");
  if (!flash) {
    flash = document.createElement("ul");
    flash.className = "flash";
    document.querySelector("main").prepend(flash);
  }
  const item = document.createElement("li");
  item.className = "flash-error";
  item.setAttribute("role", "alert");
  item.textContent = text;
  flash.append(item);
}

function setupThread() {
  const form = document.getElementById("send-form");
  if (!form || !window.fetch || !window.TextDecoder) return;
  const api = form.dataset.api;
  const list = document.getElementById("messages");
  const textarea = form.querySelector("textarea[name=content]");
  const sendButton = form.querySelector("button[type=submit]");
  const stopButton = document.getElementById("stop-button");
  const jumpButton = document.getElementById("jump-button");
  let busy = false;
  // While a reply streams the page follows it, unless the person scrolled up to read: then a
  // "Jump to latest" button brings them back (and following resumes).
  let following = true;

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 120;
  }

  function follow(item) {
    if (following) item.scrollIntoView({ block: "end" });
  }

  window.addEventListener("scroll", () => {
    if (!busy) return;
    following = nearBottom();
    jumpButton.hidden = following;
  }, { passive: true });

  jumpButton.addEventListener("click", () => {
    following = true;
    jumpButton.hidden = true;
    list.lastElementChild?.scrollIntoView({ block: "end" });
    textarea.focus();
  });

  // Esc stops the reply being written, from anywhere on the page.
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && busy && !stopButton.hidden) {
      event.preventDefault();
      stopButton.click();
    }
  });

  function bubble(role, text) {
    const item = document.createElement("li");
    item.className = `message ${role}`;
    const box = document.createElement("div");
    box.className = "bubble";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text; // text, never HTML: the server renders the final reply
    box.append(body);
    item.append(box);
    list.querySelector(".empty")?.remove();
    list.append(item);
    follow(item);
    return item;
  }

  // Swap in the server-rendered thread: Markdown, statistics, versions, buttons.
  async function refresh() {
    const response = await fetch(location.pathname, { credentials: "same-origin" });
    if (!response.ok) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.getElementById("messages");
    if (fresh) list.replaceChildren(...fresh.childNodes);
    addCopyButtons(list);
    const title = page.getElementById("thread-title");
    if (title) document.getElementById("thread-title").textContent = title.textContent;
    document.title = page.title;
    const latest = document.getElementById("latest");
    if (latest) follow(latest);
  }

  async function stream(url, body, { question = null, replaces = [] } = {}) {
    if (busy) return;
    busy = true;
    following = true;
    sendButton.disabled = true;
    stopButton.hidden = false;
    for (const item of replaces) item?.remove();
    if (question !== null) bubble("user", question);
    const reply = bubble("assistant streaming", "");
    const text = reply.querySelector(".text");
    try {
      const response = await postJSON(url, body, "text/event-stream");
      const type = response.headers.get("Content-Type") || "";
      if (!type.startsWith("text/event-stream")) {
        const error = await response.json().catch(() => ({}));
        throw new Error(error.detail || `The server answered ${response.status}.`);
      }
      for await (const event of readEvents(response)) {
        if (event.kind === "delta") {
          text.textContent += event.data.text;
          follow(reply);
        } else if (event.kind === "error") {
          showError(event.data.detail);
        } else if (event.kind === "title") {
          document.getElementById("thread-title").textContent = event.data.title;
        }
      }
    } catch (error) {
      showError(error.message || "The reply could not be streamed.");
    } finally {
      await refresh().catch(() => {});
      busy = false;
      sendButton.disabled = false;
      stopButton.hidden = true;
      jumpButton.hidden = true;
      textarea.focus({ preventScroll: !following });
    }
  }

  function send(content) {
    return stream(`${api}messages/`, { content }, { question: content });
  }

  form.addEventListener("submit", (event) => {
    const content = textarea.value;
    if (!content.trim()) return; // let the server say what is wrong
    event.preventDefault();
    textarea.value = "";
    send(content);
  });

  stopButton.addEventListener("click", () => {
    postJSON(`${api}stop/`, {}).catch(() => showError("Could not reach the server to stop."));
  });

  // Regenerate and edit forms live inside the message list, which refresh() replaces.
  list.addEventListener("submit", (event) => {
    const action = event.target.dataset.stream;
    if (!action) return;
    event.preventDefault();
    const items = list.querySelectorAll("li.message");
    const last = items[items.length - 1];
    if (action === "regenerate") {
      stream(`${api}regenerate/`, {}, { replaces: [last] });
    } else if (action === "edit") {
      const content = event.target.querySelector("textarea[name=content]").value;
      if (!content.trim()) return;
      const question = event.target.closest("li.message");
      const replaces = [question, ...(question === last ? [] : [last])];
      stream(`${api}edit/`, { content }, { question: content, replaces });
    }
  });

  // A chat started from the list page: its first message waits here to be streamed.
  const pending = sessionStorage.getItem(PENDING_KEY + form.dataset.conversation);
  if (pending !== null) {
    sessionStorage.removeItem(PENDING_KEY + form.dataset.conversation);
    send(pending);
  }
}

function setupNewChat() {
  const form = document.getElementById("new-chat-form");
  if (!form || !window.fetch || !window.sessionStorage) return;
  form.addEventListener("submit", async (event) => {
    const content = form.querySelector("textarea[name=content]").value;
    const systemPrompt = form.querySelector("textarea[name=system_prompt]");
    if (!content.trim()) return;
    event.preventDefault();
    // Sent as typed: emptied, it means no system prompt, as without JavaScript.
    const body = systemPrompt ? { system_prompt: systemPrompt.value } : {};
    try {
      const response = await postJSON(form.dataset.api, body);
      const conversation = await response.json();
      if (!response.ok) throw new Error(conversation.detail || `The server answered ${response.status}.`);
      sessionStorage.setItem(PENDING_KEY + conversation.id, content);
      location.assign(form.dataset.threadUrl.replace("00000000-0000-0000-0000-000000000000", conversation.id));
    } catch (error) {
      showError(error.message);
    }
  });
}

function setupSendBoxes() {
  for (const form of document.querySelectorAll("form.send-form")) {
    const textarea = form.querySelector("textarea[name=content]");
    if (!textarea) continue;
    textarea.addEventListener("keydown", (event) => {
      // Enter sends, Shift+Enter starts a new line, as in other chat apps.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (textarea.value.trim()) form.requestSubmit();
      }
    });
  }
}

// Copy buttons: one on each code block of a reply, one per reply. Added by the script (they
// need it to work), again after the thread is swapped in anew.
async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Without the clipboard API (an insecure origin): the old way, through a selection.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = button.textContent;
  button.textContent = "Copied ✓";
  setTimeout(() => { button.textContent = label; }, 2000);
}

function copyButton(label, describedAs, text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link copy-button";
  button.textContent = label;
  button.setAttribute("aria-label", describedAs);
  button.addEventListener("click", () => copyText(text(), button));
  return button;
}

function addCopyButtons(root) {
  for (const pre of root.querySelectorAll(".markdown pre")) {
    if (pre.querySelector(".copy-button")) continue;
    const code = pre.querySelector("code") || pre;
    pre.classList.add("has-copy");
    pre.prepend(copyButton("Copy", "Copy this code", () => code.innerText));
  }
  for (const item of root.querySelectorAll("li.message.assistant")) {
    const meta = item.querySelector(".message-meta");
    const text = item.querySelector(".bubble .text");
    if (!meta || !text || meta.querySelector(".copy-reply")) continue;
    const button = copyButton("Copy", "Copy this reply", () => text.innerText);
    button.classList.add("copy-reply");
    meta.append(" · ", button);
  }
}

// Ctrl+Shift+O (Cmd+Shift+O) starts a new chat, as in other chat apps.
function setupShortcuts() {
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.shiftKey && event.key.toLowerCase() === "o") {
      const link = document.getElementById("new-chat-link");
      const newChat = document.querySelector("#new-chat-form textarea[name=content]");
      if (!link && !newChat) return;
      event.preventDefault();
      if (newChat) newChat.focus();
      else location.assign(link.href);
    }
  });
  // Arriving at the list page for a new chat: its message box takes the keyboard (once the
  // page has loaded: the browser's move to the #new-chat-form anchor comes after this script).
  if (location.hash === "#new-chat-form") {
    const box = document.querySelector("#new-chat-form textarea[name=content]");
    window.addEventListener("load", () => setTimeout(() => box?.focus(), 0));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupShortcuts();
  addCopyButtons(document);
  setupSendBoxes();
  setupThread();
  setupNewChat();
  const latest = document.getElementById("latest");
  if (latest && !location.hash) latest.scrollIntoView({ block: "end" });
});
