"""One door to the LLM: configuration, retries with back-off, a disk cache, token accounting, JSON repair.

The `openai` client is created with ``max_retries=0`` so that the retry policy lives here, is bounded, and is
the same for every server (OpenAI, vLLM, llama.cpp, Ollama). Every response is cached on disk under the
sha256 of (model, messages, parameters): a rerun costs no tokens and an interrupted batch resumes where it
stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "movielm-fast" / "llm"

# USD per million tokens (input, output). Public list prices at the time of writing: an estimate, not a bill.
# Looked up by the longest matching prefix so dated snapshots ("gpt-4o-2024-08-06") find their family.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
}


def price_for(model: str) -> tuple[float, float] | None:
    matches = [p for p in PRICES_PER_MTOK if model.startswith(p)]
    return PRICES_PER_MTOK[max(matches, key=len)] if matches else None


# --- configuration ----------------------------------------------------------------------------------------------


@dataclass
class LLMConfig:
    base_url: str | None
    api_key: str
    model: str = DEFAULT_MODEL
    temperature: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    timeout: float = 120.0
    max_attempts: int = 5
    """Transport attempts per request (timeouts, 429, 5xx, refused connections)."""
    backoff_base: float = 1.0
    """First back-off delay in seconds; doubles per attempt up to `backoff_max`."""
    backoff_max: float = 60.0
    concurrency: int = 4
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    """None disables the cache."""


NO_ENDPOINT_HINT = (
    "set OPENAI_API_KEY (or --api-key) to use OpenAI, or point --base-url / OPENAI_BASE_URL at an "
    "OpenAI-compatible server such as http://localhost:8000/v1 (vLLM, llama.cpp, Ollama)"
)


def resolve_config(base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                   **options: Any) -> LLMConfig:
    """Flags win over OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL; a local server needs no key."""
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
    model = model or os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL
    if not base_url and not api_key:
        raise UserError("no LLM endpoint configured", NO_ENDPOINT_HINT)
    # Local servers ignore the key, but the openai client refuses to start without one.
    return LLMConfig(base_url=base_url, api_key=api_key or "no-key", model=model, **options)


def prompt(name: str, **values: Any) -> str:
    """Fill ``engine/prompts/<name>.txt``; `$name` placeholders leave JSON braces in the templates readable."""
    text = resources.files("engine").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
    return string.Template(text).substitute(**values).strip()


# --- usage ------------------------------------------------------------------------------------------------------


@dataclass
class Usage:
    """Token counts over many threads; cached responses are counted apart because they cost nothing now."""

    model: str
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, usage: dict[str, int] | None, cached: bool) -> None:
        with self._lock:
            if cached:
                self.cached += 1
                return
            self.requests += 1
            self.prompt_tokens += int((usage or {}).get("prompt_tokens") or 0)
            self.completion_tokens += int((usage or {}).get("completion_tokens") or 0)

    def cost_usd(self) -> float | None:
        price = price_for(self.model)
        if price is None:
            return None
        return (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6

    def summary(self) -> str:
        tokens = f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens"
        cost = self.cost_usd()
        digits = 4 if cost is None or cost >= 0.01 else 6
        money = f", about ${cost:.{digits}f}" if cost is not None else " (no price known for this model)"
        return f"LLM usage ({self.model}): {self.requests} request(s), {self.cached} from cache; {tokens}{money}"


# --- cache ------------------------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside the target and rename, so a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResponseCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        atomic_write_text(self._path(key), json.dumps(entry, ensure_ascii=False, indent=1))

    def drop(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


# --- the client -------------------------------------------------------------------------------------------------


@dataclass
class ChatResult:
    content: str
    cache_key: str
    cached: bool


class LLMClient:
    """Chat completions with bounded back-off, structured-output fallback and a response cache."""

    # Tried in order; a server that rejects one (400/422) is not asked with it again.
    _FORMAT_MODES = ("json_schema", "json_object", "plain")

    def __init__(self, config: LLMConfig, sleep: Callable[[float], None] = time.sleep):
        import openai

        self.config = config
        self.usage = Usage(config.model)
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._openai = openai
        self._client = openai.OpenAI(base_url=config.base_url, api_key=config.api_key,
                                     timeout=config.timeout, max_retries=0)
        self._format_mode = 0
        self._sleep = sleep
        self._lock = threading.Lock()

    def chat(self, messages: list[dict[str, str]], schema: dict[str, Any] | None = None,
             schema_name: str = "response") -> ChatResult:
        params = {"temperature": self.config.temperature, "seed": self.config.seed,
                  "max_tokens": self.config.max_tokens, "schema": schema}
        # The cache key holds what was asked for, not how the server was asked, so a rerun hits the cache
        # even when this run had to fall back from JSON-schema mode.
        key = ResponseCache.key({"model": self.config.model, "messages": messages, "params": params})
        hit = self.cache.get(key) if self.cache else None
        if hit is not None:
            self.usage.add(hit.get("usage"), cached=True)
            return ChatResult(hit["content"], key, cached=True)
        content, usage = self._request_with_format_fallback(messages, schema, schema_name)
        self.usage.add(usage, cached=False)
        if self.cache:
            self.cache.put(key, {"model": self.config.model, "messages": messages, "params": params,
                                 "content": content, "usage": usage})
        return ChatResult(content, key, cached=False)

    def forget(self, key: str) -> None:
        if self.cache:
            self.cache.drop(key)

    def _request_with_format_fallback(self, messages, schema, schema_name) -> tuple[str, dict[str, int] | None]:
        while True:
            mode = self._FORMAT_MODES[self._format_mode] if schema is not None else "plain"
            kwargs = self._base_kwargs(messages)
            if mode == "json_schema":
                kwargs["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": schema_name, "schema": schema,
                                                             "strict": True}}
            elif mode == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
            try:
                return self._request_with_backoff(kwargs)
            except (self._openai.BadRequestError, self._openai.UnprocessableEntityError) as exc:
                if mode == "plain":
                    raise UserError(f"the LLM server refused the request: {_server_message(exc)}",
                                    "check --model and the server's limits (context length, parameters)") from None
                with self._lock:
                    if self._FORMAT_MODES[self._format_mode] == mode:
                        self._format_mode += 1

    def _base_kwargs(self, messages) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.config.model, "messages": messages}
        for name in ("temperature", "seed", "max_tokens"):
            if getattr(self.config, name) is not None:
                kwargs[name] = getattr(self.config, name)
        return kwargs

    def _request_with_backoff(self, kwargs: dict[str, Any]) -> tuple[str, dict[str, int] | None]:
        oa = self._openai
        retryable = (oa.APITimeoutError, oa.APIConnectionError, oa.RateLimitError, oa.InternalServerError)
        last: Exception | None = None
        for attempt in range(self.config.max_attempts):
            if attempt:
                self._sleep(self._delay(attempt, last))
            try:
                response = self._client.chat.completions.create(**kwargs)
            except retryable as exc:
                last = exc
                continue
            except (oa.BadRequestError, oa.UnprocessableEntityError):
                raise  # the caller may retry without response_format
            except oa.APIStatusError as exc:
                if exc.status_code >= 500:
                    last = exc
                    continue
                raise self._fatal(exc) from None
            return _content_of(response), _usage_of(response)
        raise UserError(f"LLM request failed after {self.config.max_attempts} attempt(s): {_describe_failure(last)}",
                        f"check that the server at {self.config.base_url or 'api.openai.com'} is up; "
                        "raise --timeout or lower --concurrency if it is overloaded")

    def _delay(self, attempt: int, error: Exception | None) -> float:
        delay = self.config.backoff_base * 2 ** (attempt - 1)
        retry_after = _retry_after(error)
        if retry_after is not None:
            delay = max(delay, retry_after)
        # Jitter keeps concurrent workers that failed together from retrying together.
        return min(self.config.backoff_max, delay) * random.uniform(0.75, 1.0)

    def _fatal(self, exc: Exception) -> UserError:
        oa = self._openai
        where = self.config.base_url or "api.openai.com"
        if isinstance(exc, (oa.AuthenticationError, oa.PermissionDeniedError)):
            return UserError(f"the LLM server at {where} rejected the API key", "set --api-key or OPENAI_API_KEY")
        if isinstance(exc, oa.NotFoundError):
            return UserError(f"model {self.config.model!r} or the endpoint was not found at {where}",
                             "check --model, and that --base-url ends in /v1")
        return UserError(f"the LLM server refused the request: {_server_message(exc)}")


def _content_of(response: Any) -> str:
    # Some servers answer an empty choices list instead of an error; treat it as an empty (invalid) reply.
    choices = getattr(response, "choices", None)
    return (choices[0].message.content or "") if choices else ""


def _usage_of(response: Any) -> dict[str, int] | None:
    usage = getattr(response, "usage", None)
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens or 0, "completion_tokens": usage.completion_tokens or 0}


def _retry_after(error: Exception | None) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _server_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(exc)


def _describe_failure(exc: Exception | None) -> str:
    if exc is None:
        return "no attempt made"
    status = getattr(exc, "status_code", None)
    kind = {429: "rate limited (429)"}.get(status) if status else None
    if kind is None and status:
        kind = f"server error {status}"
    return kind or type(exc).__name__.replace("API", "").replace("Error", " error").strip().lower()


# --- structured output ------------------------------------------------------------------------------------------


class StructuredOutputError(UserError):
    """The model did not produce valid output within the allowed tries; the raw responses were saved."""


def extract_json(text: str) -> Any:
    """Parse a JSON object from a reply, tolerating code fences and chatter around it."""
    body = text.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", body, re.S)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError as first:
        start, end = body.find("{"), body.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(body[start:end + 1])
            except json.JSONDecodeError:
                pass
        raise ValueError(f"the reply is not valid JSON ({first.msg} at line {first.lineno} column {first.colno})") \
            from None


def complete_json(client: LLMClient, messages: list[dict[str, str]], check: Callable[[Any], Any],
                  schema: dict[str, Any] | None, raw_path: Path, label: str, max_tries: int = 3,
                  schema_name: str = "response") -> Any:
    """Ask, validate with `check` (raises ValueError listing problems), and feed problems back to repair.

    On final failure every raw reply is written to `raw_path` and the conversation is dropped from the cache,
    so a rerun asks afresh instead of replaying the same bad answers.
    """
    conversation = list(messages)
    replies: list[tuple[str, str]] = []
    keys: list[str] = []
    for _ in range(max_tries):
        result = client.chat(conversation, schema=schema, schema_name=schema_name)
        keys.append(result.cache_key)
        try:
            return check(extract_json(result.content))
        except ValueError as exc:
            replies.append((result.content, str(exc)))
            conversation += [{"role": "assistant", "content": result.content},
                             {"role": "user", "content": prompt("repair", problems=str(exc))}]
    for key in keys:
        client.forget(key)
    _save_raw(raw_path, label, replies)
    raise StructuredOutputError(
        f"{label}: no valid answer after {max_tries} tries; last problem: {replies[-1][1].splitlines()[0]}",
        f"raw replies saved to {raw_path}; try again, use a stronger --model, or raise --max-tries")


def _save_raw(path: Path, label: str, replies: list[tuple[str, str]]) -> None:
    parts = [f"# {label}: {len(replies)} invalid repl{'y' if len(replies) == 1 else 'ies'}\n"]
    for i, (content, problem) in enumerate(replies, 1):
        parts.append(f"\n===== try {i} =====\n--- problems ---\n{problem}\n--- raw reply ---\n{content}\n")
    atomic_write_text(Path(path), "".join(parts))
