"""A small real OpenAI-compatible chat-completions server on 127.0.0.1 for tests, with scripted replies.

A handler decides each reply from the request body and the request's number, so a test can script
sequences (invalid, then valid), failures (429, 500, slow), replies cut at max_tokens (``finish_reason:
"length"``), the same reply again and again, or route by prompt content (one theme fails). Error replies ask the
client to retry after 10 ms (``retry-after-ms``, which the openai client honours) unless a test sets its own
retry headers, so retries do not make the tests slow.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    status: int = 200
    content: str | None = None
    error: str = ""
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    usage: tuple[int, int] = (100, 50)
    finish_reason: str = "stop"


def _text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content)


def ok(content: Any, usage: tuple[int, int] = (100, 50)) -> Reply:
    return Reply(content=_text(content), usage=usage)


def cut(content: Any, keep: int | None = None) -> Reply:
    """A reply that hit max_tokens: finish_reason "length", the text cut after `keep` characters (default: half)."""
    text = _text(content)
    return Reply(content=text[:len(text) // 2 if keep is None else keep], finish_reason="length")


def error(status: int, message: str = "scripted failure", **headers: str) -> Reply:
    if not any(k.startswith("retry") for k in headers):
        headers["retry_after_ms"] = "10"
    return Reply(status=status, error=message, headers=headers)


def slow(seconds: float, content: Any = "{}") -> Reply:
    return Reply(content=_text(content), delay=seconds)


Handler = Callable[[dict[str, Any], int], Reply]


def scripted(*replies: Reply) -> Handler:
    """Replies in order; the last one repeats."""
    return lambda body, n: replies[min(n, len(replies) - 1)]


class FakeOpenAIServer:
    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._request_class())
        self._httpd.daemon_threads = True
        # Slow handlers may still be sleeping when a test ends; do not wait for them.
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _record(self, body: dict[str, Any]) -> int:
        with self._lock:
            self.requests.append(body)
            return len(self.requests) - 1

    def _request_class(self):
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                reply = server.handler(body, server._record(body))
                time.sleep(reply.delay)
                if reply.status != 200:
                    return self._send(reply.status, {"error": {"message": reply.error, "type": "test"}},
                                      reply.headers)
                prompt_tokens, completion_tokens = reply.usage
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                 "message": {"role": "assistant", "content": reply.content}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                }, reply.headers)

            def _send(self, status, payload, headers):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in headers.items():
                        self.send_header(key.replace("_", "-"), value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        return RequestHandler
