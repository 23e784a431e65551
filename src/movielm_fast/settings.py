"""One declaration per setting: its name, type, default and help, written once as a field of a settings model.

Everything that offers or checks a setting reads that declaration instead of keeping a table of its own:

- the CLI builds its flags from the fields (`cli/options.py`), so a flag's name, type, choices, default and help
  cannot drift from the setting's;
- `serve` derives what a submission may set for its own plan, and the reason it refuses the rest, from `served`
  (`serve/options.py`, and `render --server` on the client side);
- the models validate a value the same way whoever builds them (a flag, a test, a server request).

The models that hold settings, each owned by the layer that reads it:

    plan.RenderSettings          a plan's render block (width, steps, seed, ...); flags override it
    engine.config.ModelConfig    what a loaded model and its backend need (a server's resident model)
    run.config.RunConfig         a run's own choices: output folder, image files, resume, batch size
    run.cluster.ClusterOptions   where a run's batches go (Ray)
    serve.config.ServeLimits     what one `serve` accepts: connections, timeouts, the work of a plan

A new setting is one `setting(...)` line in the model that owns it, plus the code that uses it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from movielm_fast.errors import UserError

PER_PLAN = "plan"
"""`served`: a submission may set it for its own plan (`render --server` sends it with the plan)."""
CLIENT = "client"
"""`served`: used by the client of `render --server` itself (display); never sent."""
RESIDENT = ("is the server's: its model is loaded once, with the settings it was started with",
            "start the server with `movielm-fast serve {flag} ...`, or drop {flag} here")
LOCAL_RUN = ("is for a local run: the server renders in its own process", "drop {flag}, or render without --server")


def setting(default: Any = None, help: str = "", *, flag: str | None = "", served: str | tuple[str, str] | None = None,
            metavar: str | None = None, **constraints: Any) -> Any:
    """A settings field (pydantic's `Field`) with what the CLI and `serve` need to know about it.

    `flag`: the option as typed: "" is --the-name-with-dashes, "--a/--no-a" a switch pair, None no flag at all.
    `served`: how `serve` treats it when a submission sets it: PER_PLAN, CLIENT, or (why, hint) of the refusal,
    with {flag} for the flag as typed; None: its model's `served`. Other keywords are pydantic's constraints
    (ge, le, default_factory, ...)."""
    extra = {"flag": flag, "served": served, "metavar": metavar}
    if "default_factory" in constraints:
        return Field(description=help, json_schema_extra=extra, **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def meta(field: Any, key: str) -> Any:
    """A field's `setting(...)` metadata: flag, served or metavar (None for a plain field)."""
    return (field.json_schema_extra or {}).get(key) if isinstance(field.json_schema_extra, dict) else None


def flag_of(model: type[BaseModel], name: str) -> str | None:
    """The flag of setting `name` as typed in the CLI (its first spelling), or None if it has none."""
    flag = meta(model.model_fields[name], "flag")
    if flag is None:
        return None
    return flag.split("/")[0] if flag else "--" + name.replace("_", "-")


def validation_error(exc: ValidationError, model: type[BaseModel]) -> UserError:
    """pydantic's first error as a UserError that names the flag (or the field, for settings without one); a value
    outside a setting's choices gets the choices as its fix."""
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else ""
    where = (flag_of(model, name) or name) if name in model.model_fields else name
    if err["type"] == "literal_error":
        choices = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return UserError(f"{where}: unknown value {err['input']!r}", f"use one of: {choices}")
    message = err["msg"].removeprefix("Value error, ")
    return UserError(f"{where}: {message}" if where else message)


class Settings(BaseModel):
    """A settings model: immutable, unknown names refused, and a bad value a `UserError` naming the flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    served: ClassVar[str | tuple[str, str]] = RESIDENT
    """How `serve` treats this model's settings unless a field says otherwise."""

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise validation_error(exc, type(self)) from None

    def changed(self, **update: Any):
        """A copy with `update` applied and validated (pydantic's model_copy does not validate)."""
        return type(self)(**{**self.model_dump(), **update})
