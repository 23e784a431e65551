"""The HTTP side of `serve` (starlette, run by uvicorn: the optional extra ``movielm-fast[serve]``) and its render
thread.

    POST /plans[?out=SUB]   body: a plan (the JSON of plan.json) -> 202 {"id", "state", ...}; rendered into OUT/SUB
    GET  /plans/{id}        progress and, when finished, the run summary (`render --json`'s) or the error
    GET  /plans             every plan the server knows
    GET  /health            {"ok": true, "model": ..., "startup": the server's model-load phases}

Bad requests get a 4xx whose JSON is {"error": message, "hint": fix} -- the CLI's UserError texts: 400 malformed
JSON or an `out` outside the output root, 413 a body over the limit, 422 an invalid plan, 401 a missing token,
403 a wrong one, 404 an unknown id. A plan that fails while rendering is reported in its record; the server and the
rest of the queue go on.
"""

from __future__ import annotations

import hmac
import json
import logging
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from movielm_fast.engine.config import EngineConfig
from movielm_fast.engine.driver import Job, render_job, take_startup
from movielm_fast.engine.executors import LocalExecutor
from movielm_fast.engine.startup import StartupClock
from movielm_fast.errors import UserError

from .queue import PlanQueue, output_folder

log = logging.getLogger("movielm_fast")

MAX_BODY_BYTES = 8 * 2**20
"""The largest plan a request may carry; a plan file of thousands of frames is a few hundred KB."""


class Server:
    """The warm model (one LocalExecutor), the queue and the render thread."""

    def __init__(self, config: EngineConfig, token: str | None = None):
        self.config, self.token = config, token
        self.queue = PlanQueue(config.out)
        self.executor = LocalExecutor(config)  # the model loads once, here
        self.startup = take_startup(self.executor)  # the server's own start, charged to no plan (GET /health)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._render_loop, name="movielm-serve-render", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _render_loop(self) -> None:
        while not self._stop.is_set():
            rec = self.queue.next(timeout=0.5)
            if rec is not None:
                self._render(rec)

    def _render(self, rec: dict[str, Any]) -> None:
        job_id = rec["id"]

        def progress(n: int, total: int) -> None:  # in memory; the record on disk says running until the end
            done = (self.queue.get(job_id) or {}).get("done", 0) if n else 0
            self.queue.update(job_id, persist=False, done=done + n, total=total)

        try:
            config = replace(self.config, out=output_folder(self.config.out, rec["out"]), quiet=True)
            # The time to first image counts from the plan's arrival: its wait in the queue is a phase of its own.
            waited = max(0.0, time.time() - rec["submitted"])
            clock = StartupClock(time.perf_counter() - waited)
            clock.add("queued", waited)
            job = Job.load(config, [self.queue.plan_path(job_id)], clock, source=SERVED)
            summary = render_job(job, progress=progress, executor=self.executor).as_dict()
            self.queue.update(job_id, state="failed" if summary["failures"] else "done", summary=summary,
                              error=None)
        except UserError as exc:
            self.queue.update(job_id, state="failed", error={"error": exc.message, "hint": exc.hint})
        except Exception as exc:  # noqa: BLE001 -- one plan's crash must not stop the server or the queue
            log.exception("plan %s failed", job_id)
            self.queue.update(job_id, state="failed", error={"error": f"{type(exc).__name__}: {exc}", "hint": ""})

    def check_plan(self, text: str, out: Path) -> int:
        """The number of frames of a submitted plan; a UserError (the CLI's message) for anything wrong with it.
        Paths inside a submitted plan (style embeddings, LoRAs, refiner, VAE) must be absolute."""
        with tempfile.TemporaryDirectory(prefix="movielm-serve-check-") as tmp:
            path = Path(tmp) / "plan.json"
            path.write_text(text)
            job = Job.load(replace(self.config, out=out), [path], source=SERVED)
        return sum(len(lm.movie.frames) for lm in job.movies)


SERVED = "submitted to movielm-fast serve"
"""The source of every submitted movie's identity in OUT: submissions have no plan file of their own (each is kept
in a queue file of its own), so a movie sent again under the same id and title is the same movie and resumes; a
movie rendered there from a plan file by `render` is another one (refused without --replace)."""


def _error(status: int, exc: UserError | None = None, message: str = "", hint: str = ""):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": exc.message if exc else message, "hint": exc.hint if exc else hint}, status)


def create_app(server: Server):
    """The starlette app for `server` (starlette imported here: the optional extra)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def authorized(request) -> Any:
        if server.token is None:
            return None
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            return _error(401, message="this server needs a token",
                          hint="send 'Authorization: Bearer TOKEN' (render --server URL --token TOKEN)")
        if not hmac.compare_digest(header[7:].encode(), server.token.encode()):
            return _error(403, message="wrong token", hint="use the token the server was started with")
        return None

    async def submit(request):
        if (denied := authorized(request)) is not None:
            return denied
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return _too_large()
        body = bytearray()
        async for chunk in request.stream():  # a body without (or lying about) its length is cut off too
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _too_large()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, message="the request body is not UTF-8 text", hint="send the contents of a plan.json")
        out_sub = request.query_params.get("out")
        try:
            json.loads(text)
            out = output_folder(server.config.out, out_sub)
        except ValueError as exc:
            return _error(400, message=f"the request body is not valid JSON: {exc}",
                          hint="send the contents of a plan.json")
        except UserError as exc:
            return _error(400, exc)
        try:
            total = server.check_plan(text, out)
        except UserError as exc:
            return _error(422, exc)
        return JSONResponse(server.queue.add(text, out_sub, total), 202)

    async def status(request):
        if (denied := authorized(request)) is not None:
            return denied
        rec = server.queue.get(request.path_params["job_id"])
        if rec is None:
            return _error(404, message=f"no plan {request.path_params['job_id']!r} on this server",
                          hint="GET /plans lists them")
        return JSONResponse(rec)

    async def listing(request):
        if (denied := authorized(request)) is not None:
            return denied
        return JSONResponse({"plans": server.queue.all()})

    async def health(request):
        return JSONResponse({"ok": True, "model": server.executor.info.model_id,
                             "startup": {k: round(v, 4) for k, v in server.startup.items()}})

    return Starlette(routes=[Route("/plans", submit, methods=["POST"]), Route("/plans", listing, methods=["GET"]),
                             Route("/plans/{job_id}", status, methods=["GET"]), Route("/health", health)])


def _too_large():
    return _error(413, message=f"the plan is larger than {MAX_BODY_BYTES // 2**20} MiB",
                  hint="split it into several plans")


def serve(config: EngineConfig, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Load the model, resume the queue, and answer HTTP until interrupted."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise UserError(f"serving on {host} would let anyone on the network render on this machine",
                        "pass --token TOKEN (or MOVIELM_SERVE_TOKEN), or bind to 127.0.0.1")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve needs starlette and uvicorn", "pip install 'movielm-fast[serve]'") from None
    server = Server(config, token)
    server.start()
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
    finally:
        server.stop()
