// The page's only way to the server: the public OpenAI API, with fetch and the streamed body read as
// server-sent events. Errors come back as ApiError with the server's own message.

export class ApiError extends Error {
  constructor(message, status = 0, retryAfter = null) {
    super(message);
    this.status = status; // 0: no HTTP answer (network failure, or an error event inside the stream)
    this.retryAfter = retryAfter;
  }
}

export class Api {
  constructor(key = null) {
    this.key = key;
  }

  headers() {
    const headers = { "Content-Type": "application/json" };
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    return headers;
  }

  async request(path, init = {}) {
    let response;
    try {
      response = await fetch(path, { ...init, headers: this.headers() });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`cannot reach the server (${e.message})`);
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  // The served models' ids, in the server's order (the first is its default).
  async models() {
    const response = await this.request("/v1/models");
    return (await response.json()).data.map((m) => m.id);
  }

  // POST /v1/chat/completions with stream: true; yields each chunk's object until [DONE].
  async *streamChat(body, signal) {
    const response = await this.request("/v1/chat/completions", {
      method: "POST",
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
    for await (const data of serverSentData(response.body)) {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      // An engine that fails mid-reply ends the stream with an error event (the status line was 200).
      if (chunk.error) throw new ApiError(chunk.error.message || "the server failed the request");
      yield chunk;
    }
    throw new ApiError("the stream ended before the reply did");
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  const retry = response.headers.get("Retry-After");
  const retryAfter = retry !== null && /^\d+$/.test(retry) ? Number(retry) : null;
  return new ApiError(message, response.status, retryAfter);
}

// The data of each event of a text/event-stream body; comments (the server's keep-alive pings) are skipped.
async function* serverSentData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    // Normalized on the whole buffer: a CRLF split across two reads joins up before it is replaced.
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}
