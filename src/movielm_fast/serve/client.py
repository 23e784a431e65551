"""`movielm-fast render plan.json --server URL`: submit each plan to a running `serve`, then follow it to the end.
Standard library HTTP only: the client needs none of the [serve] extra. Render flags: cli.options.server_options."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from movielm_fast.errors import UserError
from movielm_fast.plan import absolute_plan_paths


def _call(url: str, token: str | None, data: bytes | None = None) -> dict[str, Any]:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
        req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
    except ValueError as exc:
        raise UserError(f"--server: {url} is not a URL ({exc})", "pass e.g. --server http://127.0.0.1:8765") \
            from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--server: {url} is not an http(s) URL", "pass e.g. --server http://127.0.0.1:8765")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
            if not isinstance(answer, dict):
                raise ValueError(f"a JSON {type(answer).__name__}")
            return answer
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"error": f"HTTP {exc.code}", "hint": ""}
        raise UserError(f"the server refused: {body.get('error')}", body.get("hint") or "") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot reach the server at {url}: {getattr(exc, 'reason', exc)}",
                        "start it with `movielm-fast serve`, or fix --server") from None
    except ValueError as exc:
        raise UserError(f"the server at {url} did not answer as `movielm-fast serve` does ({exc})",
                        "check --server: it is the address `movielm-fast serve` printed") from None


def submit(server: str, plan: Path, token: str | None = None, out: str | None = None,
           options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send one plan file. Its file paths go absolute, resolved against its folder as `render` resolves them
    (serve.options: the server reads them only under its --allow-files roots); `options` go with it."""
    query = f"?{urllib.parse.urlencode({'out': out})}" if out else ""
    try:
        data = Path(plan).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the plan {plan}: {exc.strerror or exc}", "pass a readable plan.json") from None
    try:
        parsed = json.loads(data)
    except ValueError:
        pass  # sent as it is: the server's answer says what is wrong with it, as for any other client
    else:
        parsed, _ = absolute_plan_paths(parsed, Path(plan).parent.resolve())
        data = json.dumps({"plan": parsed, "options": options or {}}).encode()
    return _call(f"{server.rstrip('/')}/plans{query}", token, data)


def follow(server: str, job_id: str, token: str | None = None, progress: Callable[[int, int], None] | None = None,
           poll: float = 0.25) -> dict[str, Any]:
    """Poll the plan's record until it is finished; `progress(newly done, total)` as frames complete."""
    seen = 0
    while True:
        rec = _call(f"{server.rstrip('/')}/plans/{job_id}", token)
        if progress and rec.get("done", 0) > seen:
            progress(rec["done"] - seen, rec.get("total", 0))
            seen = rec["done"]
        if rec["state"] in ("done", "failed", "cancelled"):
            return rec
        time.sleep(poll)
