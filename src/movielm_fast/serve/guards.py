"""What keeps `serve` answering under connection abuse (thousands of connections that never finish their headers):
the port taken before the model loads, a cap on open connections and a deadline for a request's headers (uvicorn's
h11 protocol, subclassed through its documented `http=` class option), and logs that say a repeated failure once
per window instead of once per connection. The limits are serve.config.ServeLimits."""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time

from movielm_fast.errors import UserError

log = logging.getLogger("movielm_fast.serve")  # LogThrottle-d by serve.app.serve

FILE_HANDLES_KEPT = 64
"""File handles kept for the renderer (weights, frames, queue records) beyond those of connections."""


def listening_socket(host: str, port: int, max_connections: int) -> socket.socket:
    """The server's socket, bound but not listening yet (connections are refused, not queued, while the model
    loads); a UserError when the port is taken or the process may not open enough files for --max-connections --
    said before the model loads, not after (where uvicorn would abort)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * max_connections + FILE_HANDLES_KEPT  # those open, and as many accepted at once (the backlog)
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise UserError(f"--max-connections {max_connections} needs {needed} file handles; this process may open "
                        f"{soft} (ulimit -n)", f"lower --max-connections to {max(1, (soft - FILE_HANDLES_KEPT) // 2)}, "
                        "or raise ulimit -n")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise UserError(f"cannot listen on {host}: {exc}", "pass --host 127.0.0.1, or an address of this machine") \
            from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                        "another program (another `movielm-fast serve`?) has the port: stop it, or pass another "
                        "--port") from None
    return sock


def guarded_protocol(max_connections: int, header_timeout: float) -> type:
    """uvicorn's h11 protocol with the two guards it lacks: a connection beyond `max_connections` is closed as soon
    as it is accepted, and one whose request headers are not complete `header_timeout` seconds after it opened (or
    after its previous response) is closed -- so idle or trickling clients cannot hold the server's file handles."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("serve: more than %d connections open (--max-connections): closing new ones",
                            max_connections)
                transport.abort()
                return
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()  # the next request on a kept-alive connection gets as long

        def _arm_header_deadline(self) -> None:
            self.loop.call_later(header_timeout, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle) -> None:
            """No request began since the deadline was armed, and none is in progress: close."""
            idle = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if idle and not self.transport.is_closing():
                self.transport.abort()

    return GuardedH11Protocol


class LogThrottle(logging.Filter):
    """Lets each message (by its template) through once per `window` seconds: the first time whole, a repeat as one
    line with the count of those dropped since. A flood of failing connections then writes a line every few
    seconds instead of a traceback per connection."""

    def __init__(self, window: float = 10.0):
        super().__init__()
        self.window = window
        self._seen: dict[str, tuple[float, int]] = {}  # template -> (when it last went through, dropped since)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = f"{record.name}:{record.msg}", time.monotonic()
        with self._lock:
            last, dropped = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.window:
                self._seen[key] = (last, dropped + 1)
                return False
            self._seen[key] = (now, 0)
        if last is not None:  # a repeat: one line, the exception named but not traced
            exc = record.exc_info[1] if record.exc_info else None
            record.msg = record.getMessage() + (f" ({type(exc).__name__}: {exc})" if exc else "") + \
                (f" [and {dropped} more like it in {now - last:.0f} s]" if dropped else "")
            record.args, record.exc_info, record.exc_text = (), None, None
        return True
