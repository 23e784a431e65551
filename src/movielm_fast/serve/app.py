"""The HTTP side of `serve` (starlette, run by uvicorn: the optional extra ``movielm-fast[serve]``) and its render
thread.

    POST   /plans[?out=SUB]   body: a plan (the JSON of plan.json), or {"plan": PLAN, "options": OPTIONS}
                              (serve.options: per-plan render flags, and the rule for the files a plan names) ->
                              202 {"id", "state", "done", "total", ...}; rendered into OUT/SUB. done and total count
                              the plan's frames, those already on disk included (after a restart too).
    GET    /plans/{id}        progress and, when finished, the run summary (`render --json`'s) or the error
    DELETE /plans/{id}        cancel: a queued plan is never rendered, a running one stops at its next denoising step
                              (frames already written stay); either way it is not resumed after a restart
    GET    /plans             every plan the server knows
    GET    /health            {"ok", "model", "startup": the server's model-load phases, "renderer": the render
                              thread's state}; 503 while the render thread is dead or failing

Bad requests get a 4xx whose JSON is {"error": message, "hint": fix} -- the CLI's UserError texts: 400 malformed
JSON or an `out` outside the output root, 408 a body not sent within --body-timeout, 409 cancelling a finished plan,
413 a body over the limit, 422 an invalid plan or options, a file outside the server's --allow-files roots, or a
plan over --max-frame-pixels / --max-plan-megapixel-steps, 401 a missing token, 403 a wrong one, 404 an unknown id;
503 when the server cannot store a plan (a full disk). A plan that fails while rendering is reported in its record;
the server and the rest of the queue go on. The connection guards (serve.config.ServeLimits) are docs/safety.md's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from movielm_fast.engine.config import ModelConfig
from movielm_fast.errors import UserError
from movielm_fast.plan import merge_settings
from movielm_fast.run.config import RunConfig
from movielm_fast.run.driver import Job, render_job, take_startup
from movielm_fast.run.executors import LocalExecutor, reason
from movielm_fast.run.startup import StartupClock

from .config import ServeLimits
from .guards import LogThrottle, guarded_protocol, listening_socket
from .options import PlanOptions, confine_paths, split_request
from .queue import PlanQueue, output_folder

log = logging.getLogger("movielm_fast")

MAX_BODY_BYTES = 8 * 2**20
"""The largest plan a request may carry; a plan file of thousands of frames is a few hundred KB."""


class PlanCancelled(BaseException):
    """Raised on the render thread at the next denoising step of a plan cancelled while rendering. A BaseException,
    as Ctrl-C is: the driver lets it through every per-batch handler and still writes every frame already rendered."""


class Server:
    """The warm model (one LocalExecutor), the queue and the render thread. `run`: the server's own run settings,
    which a submission's options replace for its plan; `limits`: what it accepts (defaults fitted to the model)."""

    def __init__(self, model: ModelConfig, run: RunConfig, token: str | None = None,
                 allow_files: tuple[Path, ...] = (), limits: ServeLimits | None = None):
        self.run, self.token = run, token
        self.allow_files = tuple(Path(p).resolve() for p in allow_files) or (Path.cwd(),)
        self.queue = PlanQueue(run.out)
        self.executor = LocalExecutor(model, on_step=self._step)  # the model loads once, here
        self.startup = take_startup(self.executor)  # the server's own start, charged to no plan (GET /health)
        native = self.executor.info.defaults
        self.limits = (limits or ServeLimits()).for_model(native["width"], native["height"])
        self._stop = threading.Event()
        self._cancelling: str | None = None  # a running plan to stop at its next step (DELETE)
        self.renderer = {"state": "idle", "plan": None, "error": None}  # GET /health; written by the render thread
        self.thread = threading.Thread(target=self._render_loop, name="movielm-serve-render", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> dict[str, Any]:
        """The render thread's state: ok only while it is alive and its last round did not fail."""
        state = dict(self.renderer, alive=self.thread.is_alive(),
                     queued=sum(r["state"] == "queued" for r in self.queue.all()))
        if not state["alive"]:
            state.update(state="dead", error=state["error"] or "the render thread has ended: restart the server")
        return {"ok": state["alive"] and state["state"] != "failing", "model": self.executor.info.model_id,
                "startup": {k: round(v, 4) for k, v in self.startup.items()}, "renderer": state}

    def _render_loop(self) -> None:
        """Render the oldest queued plan, until stopped. An error outside a plan (its queue record cannot be read or
        saved: no file handles left, a full disk) is shown on /health and retried after a growing pause; it never
        ends the loop, so plans accepted later are still rendered once the cause is gone."""
        pause = 0.5
        while not self._stop.is_set():
            try:
                rec = self.queue.next(timeout=0.5)
                if rec is not None:
                    self.renderer.update(state="rendering", plan=rec["id"])
                    self._render(rec)
                self.renderer.update(state="idle", plan=None, error=None)
                pause = 0.5
            except Exception as exc:  # noqa: BLE001 -- the loop must outlive any one failure
                self.renderer.update(state="failing", plan=None, error=reason(exc))
                log.warning("serve: the render loop failed (%s); retrying in %.0f s", reason(exc), pause)
                self._stop.wait(pause)
                pause = min(60.0, pause * 2)

    def _render(self, rec: dict[str, Any]) -> None:
        job_id = rec["id"]
        progress = _Progress(self.queue, job_id, self._check_cancel)
        try:
            options = PlanOptions.model_validate(rec.get("options") or {})
            run = self.plan_run(output_folder(self.run.out, rec["out"]), options)
            # The time to first image counts from the plan's arrival: its wait in the queue is a phase of its own.
            waited = max(0.0, time.time() - rec["submitted"])
            clock = StartupClock(time.perf_counter() - waited)
            clock.add("queued", waited)
            # Every file the plan names is checked against --allow-files again, as it is opened (links followed).
            job = Job.load(run, [self.queue.plan_path(job_id)], clock, source=SERVED, file_roots=self.allow_files)
            self.check_work(job)  # again: the limits may be lower than when it was accepted (a restart)
            summary = render_job(job, self.executor, progress).as_dict()
            self.queue.update(job_id, state="failed" if summary["failures"] else "done", summary=summary,
                              error=None, done=summary["skipped"] + summary["rendered"])
        except PlanCancelled:
            self.queue.update(job_id, state="cancelled", error=None)  # the frames written so far are kept
        except UserError as exc:
            self.queue.update(job_id, state="failed", error={"error": exc.message, "hint": exc.hint})
        except Exception as exc:  # noqa: BLE001 -- one plan's crash must not stop the server or the queue
            log.exception("plan %s failed", job_id)
            self.queue.update(job_id, state="failed", error={"error": f"{type(exc).__name__}: {exc}", "hint": ""})

    def _step(self, done: int, steps: int) -> None:
        self._check_cancel()

    def _check_cancel(self) -> None:
        if self._cancelling is not None and self._cancelling == self.renderer["plan"]:
            raise PlanCancelled()

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a plan (see the module docstring); its record (still "running" when it was: it stops at its next
        step), None for an unknown id, a UserError when it is finished already."""
        rec = self.queue.get(job_id)
        if rec is None:
            return None
        if rec["state"] == "queued" and self.queue.cancel_queued(job_id):
            return self.queue.get(job_id)
        if rec["state"] == "running":
            self._cancelling = job_id  # the record says cancelled once the render thread has stopped
            return self.queue.get(job_id)
        raise UserError(f"plan {job_id} is {self.queue.get(job_id)['state']} already", "nothing to cancel")

    def plan_run(self, out: Path, options: PlanOptions) -> RunConfig:
        """The server's run settings with a submission's options: each one given replaces the server's own."""
        given = {k: v for k, v in options.model_dump(exclude={"render"}).items() if v is not None}
        return self.run.changed(out=out, quiet=True, overrides=merge_settings(options.render, self.run.overrides),
                                **given)

    def check_plan(self, data: Any, out: Path) -> tuple[str, PlanOptions, int]:
        """A submission's JSON -> (the plan's text with absolute paths, its options, its number of frames); a
        UserError (the CLI's message) for anything wrong with it, a file outside --allow-files or work over the
        limits included."""
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
            job = Job.load(self.plan_run(out, options), [path], source=SERVED, file_roots=self.allow_files)
        self.check_work(job)
        return text, options, sum(len(lm.movie.frames) for lm in job.movies)

    def check_work(self, job: Job) -> None:
        """A UserError when a frame asks for more pixels, or the plan for more megapixel-steps, than this server
        renders (serve.config.ServeLimits): one plan must not hold the model for hours."""
        limits, work = self.limits, 0.0
        for lm in job.movies:
            s = self.executor.info.resolved(lm, job.run.overrides)
            if s.width * s.height > limits.max_frame_pixels:
                raise UserError(f"movie {lm.movie.id!r} asks for {s.width}x{s.height} frames ({s.width * s.height:,} "
                                f"pixels); this server renders at most {limits.max_frame_pixels:,} per frame",
                                "ask for a smaller width and height, or start the server with a higher "
                                "--max-frame-pixels")
            work += len(lm.movie.frames) * s.width * s.height / 1e6 * s.steps
        if work > limits.max_plan_megapixel_steps:
            raise UserError(f"the plan asks for {work:,.1f} megapixel-steps (frames x width x height x steps); this "
                            f"server takes at most {limits.max_plan_megapixel_steps:,.1f} per plan",
                            "split it into several plans, use fewer steps or smaller frames, or start the server "
                            "with a higher --max-plan-megapixel-steps")


class _Progress:
    """A plan's progress in its record (in memory; the record on disk says running until the end): done counts the
    plan's frames, those already on disk when rendering starts (before a restart, or from an earlier submission)
    included, against its total. A cancel request stops the plan here too, between batches."""

    def __init__(self, queue: PlanQueue, job_id: str, check_cancel: Callable[[], None]):
        self.queue, self.job_id, self.check_cancel = queue, job_id, check_cancel

    def skipped(self, frames: int) -> None:
        self.queue.update(self.job_id, persist=False, done=frames)

    def __call__(self, rendered: int, left: int) -> None:
        if rendered:
            self.queue.update(self.job_id, persist=False, done=self.queue.get(self.job_id)["done"] + rendered)
        self.check_cancel()


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
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 9110)
            return _error(401, message="this server needs a token",
                          hint="send 'Authorization: Bearer TOKEN' (render --server URL --token TOKEN)")
        if not hmac.compare_digest(token.strip().encode(), server.token.encode()):
            return _error(403, message="wrong token", hint="use the token the server was started with")
        return None

    async def read_body(request) -> bytes | None:
        """The body, or None when it is over MAX_BODY_BYTES (a body without, or lying about, its length too)."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return None
        return bytes(body)

    async def submit(request):
        if (denied := authorized(request)) is not None:
            return denied
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return _too_large()
        try:
            body = await asyncio.wait_for(read_body(request), server.limits.body_timeout)
        except asyncio.TimeoutError:
            return _error(408, message=f"the request body did not arrive within {server.limits.body_timeout:g} s",
                          hint="send the plan in one go (the server's --body-timeout)")
        if body is None:
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
        except OSError as exc:  # the server's side: no file handles or disk for the check's temporary file
            return _unavailable(str(exc.strerror or exc))
        try:
            rec = server.queue.add(plan_text, out_sub, total, options.model_dump(exclude_defaults=True))
        except UserError as exc:  # a full disk: nothing was accepted, and nothing is left behind
            return _unavailable(exc.message)
        return JSONResponse(rec, 202)

    def _unavailable(why: str):
        return _error(503, message=f"the server cannot store the plan: {why}",
                      hint="try again later (the server's operator: free disk space on its output root)")

    async def status(request):
        if (denied := authorized(request)) is not None:
            return denied
        rec = server.queue.get(request.path_params["job_id"])
        if rec is None:
            return _unknown(request)
        return JSONResponse(rec)

    async def cancel(request):
        if (denied := authorized(request)) is not None:
            return denied
        try:
            rec = server.cancel(request.path_params["job_id"])
        except UserError as exc:
            return _error(409, exc)
        return _unknown(request) if rec is None else JSONResponse(rec, 202 if rec["state"] == "running" else 200)

    async def listing(request):
        if (denied := authorized(request)) is not None:
            return denied
        return JSONResponse({"plans": server.queue.all()})

    async def health(request):
        report = server.health()
        return JSONResponse(report, 200 if report["ok"] else 503)

    return Starlette(routes=[Route("/plans", submit, methods=["POST"]), Route("/plans", listing, methods=["GET"]),
                             Route("/plans/{job_id}", status, methods=["GET"]),
                             Route("/plans/{job_id}", cancel, methods=["DELETE"]), Route("/health", health)])


def _unknown(request):
    return _error(404, message=f"no plan {request.path_params['job_id']!r} on this server",
                  hint="GET /plans lists them")


def _too_large():
    return _error(413, message=f"the plan is larger than {MAX_BODY_BYTES // 2**20} MiB",
                  hint="split it into several plans")


def serve(model: ModelConfig, run: RunConfig, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          allow_files: tuple[Path, ...] = (), limits: ServeLimits | None = None) -> None:
    """Take the port, load the model, resume the queue, and answer HTTP until interrupted."""
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise UserError(f"serving on {host} would let anyone on the network render on this machine",
                        "pass --token TOKEN (or MOVIELM_SERVE_TOKEN), or bind to 127.0.0.1")
    try:
        import uvicorn
    except ImportError:
        raise UserError("serve needs starlette and uvicorn", "pip install 'movielm-fast[serve]'") from None
    limits = limits or ServeLimits()
    sock = listening_socket(host, port, limits.max_connections)  # before the model loads: a busy port fails fast
    try:
        server = Server(model, run, token, allow_files, limits)
        server.start()
        # The backlog bounds how many connections one wake-up of the event loop accepts before any is closed.
        config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning",
                                backlog=limits.max_connections,
                                http=guarded_protocol(limits.max_connections, limits.header_timeout))
        # After uvicorn's logging set-up, which resets the loggers it configures.
        for name in ("uvicorn.error", "asyncio", "movielm_fast.serve"):
            logging.getLogger(name).addFilter(LogThrottle())
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            server.stop()
    finally:
        sock.close()
