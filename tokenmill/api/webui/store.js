// What the page keeps in the browser: conversations and settings in localStorage (they outlive the tab),
// the API key in sessionStorage (it goes when the tab closes). Nothing of it is sent anywhere but /v1.

const CONVERSATIONS = "tokenmill.conversations";
const SETTINGS = "tokenmill.settings";
const KEY = "tokenmill.apiKey";

function read(storage, name, fallback) {
  try {
    return JSON.parse(storage.getItem(name)) ?? fallback;
  } catch {
    return fallback; // unreadable (another page's format, or edited by hand): start afresh
  }
}

function write(storage, name, value) {
  try {
    storage.setItem(name, JSON.stringify(value));
  } catch {
    // full or disabled: the page still works, it just forgets on reload
  }
}

// Conversations, newest first: {id, title, updated, messages: [{role, content, stats?, error?, stopped?}]}.
export function loadConversations() {
  const conversations = read(localStorage, CONVERSATIONS, []);
  if (!Array.isArray(conversations)) return [];
  return conversations.filter((c) => c && typeof c.title === "string" && Array.isArray(c.messages));
}

export function saveConversations(conversations) {
  write(localStorage, CONVERSATIONS, conversations);
}

export function loadSettings() {
  return read(localStorage, SETTINGS, {});
}

export function saveSettings(settings) {
  write(localStorage, SETTINGS, settings);
}

export function loadKey() {
  return sessionStorage.getItem(KEY);
}

export function saveKey(key) {
  sessionStorage.setItem(KEY, key);
}
