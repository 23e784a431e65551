"""The HTTP side of `serve` (starlette, run by uvicorn: the optional extra ``movielm-fast[serve]``) and its render
thread.

    POST /plans[?out=SUB]   body: a plan (the JSON of plan.json), or {"plan": PLAN, "options": OPTIONS} (serve.options:
                            per-plan render flags, and the rule for the files a plan names) -> 202 {"id", "state",
                            "done", "total", ...}; rendered into OUT/SUB. done and total count the plan's frames,
                            those already on disk included (after a restart too).
    GET  /plans/{id}        progress and, when finished, the run summary (`render --json`'s) or the error
    GET  /plans             every plan the server knows
    GET  /health            {"ok": true, "model": ..., "startup": the server's model-load phases}

Bad requests get a 4xx whose JSON is {"error": message, "hint": fix} -- the CLI's UserError texts: 400 malformed
JSON or an `out` outside the output root, 413 a body over the limit, 422 an invalid plan or options, or a file
outside the server's --allow-files roots, 401 a missing token,
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
from pathlib import Path
from typing import Any

from movielm_fast.engine.config import ModelConfig
from movielm_fast.errors import UserError
from movielm_fast.plan import merge_settings
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import Job, render_job, take_startup
from movielm_fast.run.executors import LocalExecutor
from movielm_fast.run.startup import StartupClock

from .options import PlanOptions, confine_paths, split_request
from .queue import PlanQueue, output_folder

log = logging.getLogger("movielm_fast")

MAX_BODY_BYTES = 8 * 2**20
"""The largest plan a request may carry; a plan file of thousands of frames is a few hundred KB."""


class Server:
    """The warm model (one LocalExecutor), the queue and the render thread. `run`: the server's own run settings,
    which a submission's options replace for its plan."""

    def __init__(self, model: ModelConfig, run: RunConfig, token: str | None = None,
                 allow_files: tuple[Path, ...] = ()):
        self.run, self.token = run, token
        self.allow_files = tuple(Path(p).resolve() for p in allow_files) or (Path.cwd(),)
        self.queue = PlanQueue(run.out)
        self.executor = LocalExecutor(model)  # the model loads once, here
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

        progress = _Progress(self.queue, job_id)
        try:
            options = PlanOptions.model_validate(rec.get("options") or {})
            run = self.plan_run(output_folder(self.run.out, rec["out"]), options)
            # The time to first image counts from the plan's arrival: its wait in the queue is a phase of its own.
            waited = max(0.0, time.time() - rec["submitted"])
            clock = StartupClock(time.perf_counter() - waited)
            clock.add("queued", waited)
            job = Job.load(run, [self.queue.plan_path(job_id)], clock, source=SERVED)
            summary = render_job(job, self.executor, progress).as_dict()
            self.queue.update(job_id, state="failed" if summary["failures"] else "done", summary=summary,
                              error=None, done=summary["skipped"] + summary["rendered"])
        except UserError as exc:
            self.queue.update(job_id, state="failed", error={"error": exc.message, "hint": exc.hint})
        except Exception as exc:  # noqa: BLE001 -- one plan's crash must not stop the server or the queue
            log.exception("plan %s failed", job_id)
            self.queue.update(job_id, state="failed", error={"error": f"{type(exc).__name__}: {exc}", "hint": ""})

    def plan_run(self, out: Path, options: PlanOptions) -> RunConfig:
        """The server's run settings with a submission's options: each one given replaces the server's own."""
        given = {k: v for k, v in options.model_dump(exclude={"render"}).items() if v is not None}
        return self.run.changed(out=out, quiet=True, overrides=merge_settings(options.render, self.run.overrides),
                                **given)

    def check_plan(self, data: Any, out: Path) -> tuple[str, PlanOptions, int]:
        """A submission's JSON -> (the plan's text with absolute paths, its options, its number of frames); a
        UserError (the CLI's message) for anything wrong with it, a file outside --allow-files included."""
        from movielm_fast.engine.models import check_refiner, vae_folder  # as `render` checks its flags

        plan, options = split_request(data)
        plan, options = confine_paths(plan, options, self.allow_files)
        if options.render.refiner:
            check_refiner(options.render.refiner)
        if options.render.vae:
            vae_folder(options.render.vae)
        text = json.dumps(plan)
        with tempfile.TemporaryDirectory(prefix="movielm-serve-check-") as tmp:
            path = Path(tmp) / "plan.json"
            path.write_text(text)
            job = Job.load(self.plan_run(out, options), [path], source=SERVED)
        return text, options, sum(len(lm.movie.frames) for lm in job.movies)


class _Progress:
    """A plan's progress in its record (in memory; the record on disk says running until the end): done counts the
    plan's frames, those already on disk when rendering starts (before a restart, or from an earlier submission)
    included, against its total."""

    def __init__(self, queue: PlanQueue, job_id: str):
        self.queue, self.job_id = queue, job_id

    def skipped(self, frames: int) -> None:
        self.queue.update(self.job_id, persist=False, done=frames)

    def __call__(self, rendered: int, left: int) -> None:
        if rendered:
            self.queue.update(self.job_id, persist=False, done=self.queue.get(self.job_id)["done"] + rendered)


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
            data = json.loads(text)
            out = output_folder(server.run.out, out_sub)
        except ValueError as exc:
            return _error(400, message=f"the request body is not valid JSON: {exc}",
                          hint="send the contents of a plan.json")
        except UserError as exc:
            return _error(400, exc)
        try:
            plan_text, options, total = server.check_plan(data, out)
        except UserError as exc:
            return _error(422, exc)
        return JSONResponse(server.queue.add(plan_text, out_sub, total, options.model_dump(exclude_defaults=True)),
                            202)

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


def serve(model: ModelConfig, run: RunConfig, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          allow_files: tuple[Path, ...] = ()) -> None:
    """Load the model, resume the queue, and answer HTTP until interrupted."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise UserError(f"serving on {host} would let anyone on the network render on this machine",
                        "pass --token TOKEN (or MOVIELM_SERVE_TOKEN), or bind to 127.0.0.1")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve needs starlette and uvicorn", "pip install 'movielm-fast[serve]'") from None
    server = Server(model, run, token, allow_files)
    server.start()
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning")
    finally:
        server.stop()
