"""The serve queue, on disk: a plan is accepted only once its file and its record are written (atomically), so a
killed server loses nothing it answered 202 for. On restart every record not finished goes back to the queue, and
the driver's resume skips the frames already on disk: nothing is rendered twice.

    OUT/.movielm-serve/<id>.plan.json   the plan as submitted, its file paths made absolute (serve.options)
    OUT/.movielm-serve/<id>.json        {"id", "out", "options", "state": queued|running|done|failed|cancelled,
                                         "done", "total", "summary", "error", "submitted"}

Any other file there (a stray JSON, a record cut short) is ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from movielm_fast.errors import UserError
from movielm_fast.paths import atomic_write_text

log = logging.getLogger("movielm_fast")

FINISHED = ("done", "failed", "cancelled")
JOB_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")  # PlanQueue.add's ids: they name the queue's files


def output_folder(root: Path, sub: str | None) -> Path:
    """OUT/<sub> for a plan's `out`; a UserError for anything that would leave the output root."""
    if not sub:
        return root
    target = (root / sub).resolve()
    if Path(sub).is_absolute() or not target.is_relative_to(root.resolve()) or ".movielm-serve" in Path(sub).parts:
        raise UserError(f"out {sub!r} is outside the server's output root {root}",
                        "give a folder relative to the server's --out, without '..'")
    return target


def _record(path: Path) -> dict[str, Any] | None:
    """The queue record in `path`, or None (with a warning) for a file that is not one of ours: cut short by a
    crash (its plan was never acknowledged), or a stray file someone put in the folder."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    fields = {"id": str, "out": str, "state": str, "submitted": (int, float), "done": int, "total": int}
    if not (isinstance(rec, dict) and all(isinstance(rec.get(k), t) for k, t in fields.items())
            and rec["id"] == path.stem and JOB_ID.match(rec["id"]) and path.with_suffix(".plan.json").is_file()):
        log.warning("serve: %s is not a queue record of this server: ignored", path)
        return None
    return rec


class PlanQueue:
    """Accepted plans in arrival order, their progress, and the wake-up of the render thread."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / ".movielm-serve"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Condition()
        self.records: dict[str, dict[str, Any]] = {}
        for path in sorted(self.dir.glob("*.json")):
            if path.name.endswith(".plan.json") or (rec := _record(path)) is None:
                continue
            if rec["state"] not in FINISHED:
                rec["state"] = "queued"  # accepted and not finished: resumed (finished frames are skipped)
            self.records[rec["id"]] = rec

    def plan_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.plan.json"

    def add(self, plan_text: str, out_sub: str | None, total: int, options: dict[str, Any] | None = None
            ) -> dict[str, Any]:
        """Accept a plan: its file and record written, or a UserError (a full disk) with neither left behind."""
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        rec = {"id": job_id, "out": out_sub or "", "options": options or {}, "state": "queued", "done": 0,
               "total": total, "summary": None, "error": None, "submitted": time.time()}
        try:
            atomic_write_text(self.plan_path(job_id), plan_text)
            with self._lock:
                self._save(rec)
                self.records[job_id] = rec
                self._lock.notify_all()
        except BaseException:
            self.plan_path(job_id).unlink(missing_ok=True)
            raise
        return dict(rec)

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The oldest queued record, marked running; None after `timeout` seconds with nothing queued."""
        with self._lock:
            self._lock.wait_for(lambda: self._queued(), timeout)
            queued = self._queued()
            if not queued:
                return None
            rec = min(queued, key=lambda r: r["submitted"])
            self.update(rec["id"], state="running")
            return rec

    def cancel_queued(self, job_id: str) -> bool:
        """Mark a queued plan cancelled (never rendered, not resumed); False if it is no longer queued."""
        with self._lock:
            if self.records[job_id]["state"] != "queued":
                return False
            self.update(job_id, state="cancelled")
            return True

    def _queued(self) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if r["state"] == "queued"]

    def update(self, job_id: str, persist: bool = True, **fields: Any) -> None:
        """Change a record in memory, and on disk with `persist`. A record that cannot be saved (no file handles
        left, a full disk) is logged and kept in memory: the next update saves it again, and a restart resumes the
        plan from what was last saved (its finished frames are skipped)."""
        with self._lock:
            rec = self.records[job_id]
            rec.update(fields)
            if persist:
                try:
                    self._save(rec)
                except (UserError, OSError) as exc:
                    log.warning("serve: cannot save the record of plan %s (%s); kept in memory", job_id, exc)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            rec = self.records.get(job_id)
            return dict(rec) if rec else None

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in sorted(self.records.values(), key=lambda r: r["submitted"])]

    def _save(self, rec: dict[str, Any]) -> None:
        atomic_write_text(self.dir / f"{rec['id']}.json", json.dumps(rec))
