"""User-facing errors.

A `UserError` is a mistake the user can fix (bad plan, missing model, unwritable folder...). The CLI prints
its message and hint on one or two lines and exits with code 2 -- never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; `hint` says how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class PlanError(UserError):
    """Every problem found in a plan file at once, each as (JSON path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s) in the plan"]
        lines += [f"  {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))

    def __str__(self) -> str:
        return self.message
