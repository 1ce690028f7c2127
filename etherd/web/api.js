// The signed-in session and the HTTP calls the page makes.
//
// The token lives in sessionStorage: it survives a reload of this tab and is gone when the
// tab closes; it is never written to localStorage or a cookie. In development mode the
// server's development token is used when none was given.

import { tokenExpiry } from "/client.js";

const KEY = "etherd.token";

/** A refused request: HTTP status plus etherd's error code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const session = {
  /** The token in use, or null. */
  token: null,
  /** The caller as GET /api/whoami describes it. */
  who: null,
  /** The server's development token, when development auth is on. */
  devToken: null,
  /** Called when the server refuses the token (401); set by app.js. */
  onUnauthorized: () => {},

  /** A token given earlier in this tab, else the development token. */
  stored() {
    return sessionStorage.getItem(KEY) || this.devToken;
  },

  /** Keep a token the person gave for this tab's session. */
  remember(token) {
    sessionStorage.setItem(KEY, token);
  },

  forget() {
    sessionStorage.removeItem(KEY);
    this.token = null;
    this.who = null;
  },

  /** The token for the realtime client: null once it has expired, so nobody sends it. */
  current() {
    const exp = this.token ? tokenExpiry(this.token) : null;
    return exp !== null && exp * 1000 <= Date.now() ? null : this.token;
  },
};

/** A random idempotency key (works outside secure contexts too). */
export function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Call the API with the session's token. Resolves to the decoded JSON body; rejects with an
 * ApiError (or a TypeError when the server cannot be reached).
 * @param {string} method
 * @param {string} path
 * @param {{body?: any, token?: string, idempotent?: boolean}} [opts]
 */
export async function api(method, path, opts = {}) {
  const headers = { Accept: "application/json" };
  const token = opts.token ?? session.token;
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.body);
    // A retry of the same action (a double click, a flaky network) is answered once.
    if (opts.idempotent !== false && method !== "GET") headers["Idempotency-Key"] = newKey();
  }
  const resp = await fetch(path, { method, headers, body, cache: "no-store" });
  let data = null;
  if ((resp.headers.get("Content-Type") || "").startsWith("application/json")) {
    data = await resp.json();
  }
  if (!resp.ok) {
    const error = data?.error ?? {};
    const err = new ApiError(resp.status, error.code ?? "http_error", error.message ?? resp.statusText);
    if (resp.status === 401 && opts.token === undefined) session.onUnauthorized(err);
    throw err;
  }
  return data;
}

/** A message for a failed call, fit for a person. */
export function describeError(err) {
  if (err instanceof ApiError) return err.message;
  return "The server cannot be reached. Check that etherd is running, then try again.";
}
