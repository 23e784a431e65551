"""One door to the LLM: configuration, structured-output fallback, a disk cache, token accounting, JSON repair.

Transport retries (timeouts, 429, 5xx, refused connections) are the `openai` client's own: ``max_retries`` with
its exponential back-off and the server's Retry-After. What lives here is what the client does not know: which
structured-output mode (JSON schema, JSON object, plain) a server supports, sizing replies, and turning a reply
into valid data with repair round trips. Every response is cached on disk under the sha256 of (server, model,
messages, parameters), below ``$MOVIELM_CACHE/llm``: a rerun costs no tokens and an interrupted batch resumes where it
stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from movielm_fast.errors import UserError
from movielm_fast.optional import require
from movielm_fast.paths import atomic_write_text, cache_root
from movielm_fast.plan import limit, limit_hint

DEFAULT_MODEL = "gpt-4o-mini"


def default_cache_dir() -> Path:
    """Read at call time, so $MOVIELM_CACHE set after import still counts."""
    return cache_root() / "llm"


# --- configuration ----------------------------------------------------------------------------------------------


@dataclass
class LLMConfig:
    base_url: str | None
    api_key: str
    model: str = DEFAULT_MODEL
    temperature: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    """Cap on tokens per reply for every request; None: each request is sized from what it asks for."""
    timeout: float = 120.0
    max_retries: int = 4
    """Retries by the openai client (timeouts, 429, 5xx, refused connections), with its own back-off."""
    concurrency: int = 4
    cache_dir: Path | None = field(default_factory=default_cache_dir)
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
    """Fill ``data/prompts/<name>.txt``; `$name` placeholders leave JSON braces in the templates readable."""
    text = resources.files("movielm_fast.data").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
    return string.Template(text).substitute(**values).strip()


# --- usage ------------------------------------------------------------------------------------------------------


@dataclass
class Usage:
    """Token counts over many threads; cached responses are counted apart because they cost nothing now.
    No money: prices differ per provider and change, and local servers have none."""

    model: str
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    repairs: int = 0
    """Round trips that sent an answer back to be fixed."""
    cut: int = 0
    """Replies that stopped at the max_tokens limit."""
    notes: list[str] = field(default_factory=list)
    """What changed for the rest of the run, e.g. a structured-output mode given up."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, usage: dict[str, int] | None, cached: bool) -> None:
        with self._lock:
            if cached:
                self.cached += 1
                return
            self.requests += 1
            self.prompt_tokens += int((usage or {}).get("prompt_tokens") or 0)
            self.completion_tokens += int((usage or {}).get("completion_tokens") or 0)

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(text)

    def summary(self) -> str:
        tokens = f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens"
        extra = f"; {self.repairs} repair round trip(s)" if self.repairs else ""
        extra += f"; {self.cut} reply(ies) cut at max_tokens" if self.cut else ""
        return f"LLM usage ({self.model}): {self.requests} request(s), {self.cached} from cache; {tokens}{extra}"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "requests": self.requests, "cached": self.cached,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "repairs": self.repairs, "cut": self.cut, "notes": list(self.notes)}


# --- cache ------------------------------------------------------------------------------------------------------


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
            entry = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # damaged, not UTF-8, a number too long to read: a miss
            return None
        return entry if isinstance(entry, dict) and isinstance(entry.get("content"), str) else None

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
    finish_reason: str | None = None
    """"length" when the reply stopped at `max_tokens` (it is cut, not merely malformed)."""
    max_tokens: int | None = None
    """The limit the reply was asked under."""


class LLMClient:
    """Chat completions with structured-output fallback and a response cache; the openai client retries."""

    # Tried in order; a server that rejects one (400/422) or times out under one is not asked with it again.
    # "json_schema_loose" is the schema without array-length bounds (minItems/maxItems), which grammar-based servers
    # such as llama.cpp enforce and some strict-mode implementations refuse.
    _FORMAT_MODES = ("json_schema", "json_schema_loose", "json_object", "plain")

    def __init__(self, config: LLMConfig):
        # Imported here, not at module top: openai is the optional [llm] extra, and plan files, derived QA and
        # the dataset export import this module without it.
        openai = require("openai", "llm", "talking to an LLM (plan, qa)")
        self.config = config
        self.usage = Usage(config.model)
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._openai = openai
        self._client = openai.OpenAI(base_url=config.base_url, api_key=config.api_key, timeout=config.timeout,
                                     max_retries=config.max_retries,
                                     http_client=bounded_http_client(openai, config.timeout, limit("reply_bytes")))
        # A structured mode's first attempt goes out without retries: a timeout there usually means the model
        # rambles under the grammar, and repeating it would cost minutes before the fallback. Other transport
        # errors then get the remaining retries.
        self._client_once = self._client.with_options(max_retries=0)
        self._client_rest = self._client.with_options(max_retries=max(0, config.max_retries - 1))
        self._format_mode = 0
        self._lock = threading.Lock()

    def max_tokens_for(self, requested: int | None) -> int | None:
        """The user's --max-tokens wins over what a request sized for itself."""
        return self.config.max_tokens if self.config.max_tokens is not None else requested

    def chat(self, messages: list[dict[str, str]], schema: dict[str, Any] | None = None,
             schema_name: str = "response", max_tokens: int | None = None) -> ChatResult:
        limit = self.max_tokens_for(max_tokens)
        params = {"temperature": self.config.temperature, "seed": self.config.seed, "max_tokens": limit,
                  "schema": schema}
        # The cache key holds what was asked for and of which server, not how the server was asked, so a rerun hits
        # the cache even when this run had to fall back from JSON-schema mode, and another server is asked afresh.
        key = ResponseCache.key({"base_url": self.config.base_url, "model": self.config.model, "messages": messages,
                                 "params": params})
        hit = self.cache.get(key) if self.cache else None
        if hit is not None:
            self.usage.add(hit.get("usage"), cached=True)
            return ChatResult(hit["content"], key, True, hit.get("finish_reason"), limit)
        content, usage, finish = self._request_with_format_fallback(messages, schema, schema_name, limit)
        self.usage.add(usage, cached=False)
        if finish == "length":
            self.usage.count("cut")
        if self.cache:
            self.cache.put(key, {"model": self.config.model, "messages": messages, "params": params,
                                 "content": content, "usage": usage, "finish_reason": finish})
        return ChatResult(content, key, False, finish, limit)

    def forget(self, key: str) -> None:
        if self.cache:
            self.cache.drop(key)

    def _request_with_format_fallback(self, messages, schema, schema_name, max_tokens):
        oa = self._openai
        while True:
            mode = self._FORMAT_MODES[self._format_mode] if schema is not None else "plain"
            kwargs = self._base_kwargs(messages, max_tokens)
            if mode in ("json_schema", "json_schema_loose"):
                sent = schema if mode == "json_schema" else without_array_bounds(schema)
                kwargs["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": schema_name, "schema": sent, "strict": True}}
            elif mode == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
            try:
                return self._send(kwargs, structured=mode != "plain")
            except (oa.BadRequestError, oa.UnprocessableEntityError) as exc:
                if mode == "plain":
                    raise UserError(f"the LLM server refused the request: {_server_message(exc)}",
                                    "check --model and the server's limits (context length, parameters)") from None
                # Without bounds in the schema, the loose mode would send the same refused schema again.
                bounded = mode == "json_schema" and without_array_bounds(schema) != schema
                self._give_up(mode, f"was refused ({_server_message(exc)})", "json_schema_loose" if bounded else
                              "json_object")
            except oa.APITimeoutError:
                if mode == "plain":
                    raise self._transport_failure("timed out", self.config.max_retries + 1) from None
                # A model rambling under one JSON schema grammar rambles under the other as well.
                self._give_up(mode, f"timed out after {self.config.timeout:g} s", "json_object")

    def _give_up(self, mode: str, why: str, following: str) -> None:
        with self._lock:
            if self._FORMAT_MODES[self._format_mode] != mode:
                return  # another thread already moved on from this mode
            self._format_mode = max(self._format_mode + 1, self._FORMAT_MODES.index(following))
            following = self._FORMAT_MODES[self._format_mode]
        self.usage.note(f"structured output {mode} {why}; using {following} from now on")

    def _base_kwargs(self, messages, max_tokens: int | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.config.model, "messages": messages}
        for name in ("temperature", "seed"):
            if getattr(self.config, name) is not None:
                kwargs[name] = getattr(self.config, name)
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        return kwargs

    def _send(self, kwargs: dict[str, Any], structured: bool) -> tuple[str, dict[str, int] | None, str | None]:
        oa = self._openai
        client, attempts = self._client, self.config.max_retries + 1
        try:
            if structured:
                try:
                    return self._reply(self._client_once.chat.completions.create(**kwargs))
                except (oa.RateLimitError, oa.InternalServerError, oa.APIConnectionError) as exc:
                    if isinstance(exc, oa.APITimeoutError) or self.config.max_retries == 0:
                        raise
                client = self._client_rest
            return self._reply(client.chat.completions.create(**kwargs))
        except (oa.BadRequestError, oa.UnprocessableEntityError, oa.APITimeoutError):
            raise  # the caller falls back to another mode, or reports it
        except (oa.RateLimitError, oa.InternalServerError, oa.APIConnectionError) as exc:
            raise self._transport_failure(_describe_failure(exc), attempts) from None
        except oa.APIStatusError as exc:
            raise self._fatal(exc) from None
        except (ValueError, oa.APIResponseValidationError) as exc:  # a 200 whose body is not JSON
            raise self._garbled(exc) from None

    def _reply(self, response: Any) -> tuple[str, dict[str, int] | None, str | None]:
        """(content, usage, finish reason) of a chat completion; a UserError when the reply is JSON of another
        shape (a server that answers 200 with something else)."""
        try:
            return _content_of(response), _usage_of(response), _finish_of(response)
        except (AttributeError, TypeError, IndexError, KeyError, ValueError) as exc:
            raise self._garbled(exc) from None

    def _garbled(self, exc: Exception) -> UserError:
        return UserError(f"the LLM server at {self.config.base_url or 'api.openai.com'} answered with something "
                         f"that is not a chat completion ({type(exc).__name__}: {str(exc)[:120]})",
                         "check that --base-url is an OpenAI-compatible endpoint (it ends in /v1); other requests "
                         "are kept, and rerunning retries this one")

    def _transport_failure(self, what: str, attempts: int) -> UserError:
        return UserError(f"LLM request failed after {attempts} attempt(s): {what}",
                         f"check that the server at {self.config.base_url or 'api.openai.com'} is up; "
                         "raise --timeout or lower --concurrency if it is overloaded")

    def _fatal(self, exc: Exception) -> UserError:
        oa = self._openai
        where = self.config.base_url or "api.openai.com"
        if isinstance(exc, (oa.AuthenticationError, oa.PermissionDeniedError)):
            return UserError(f"the LLM server at {where} rejected the API key", "set --api-key or OPENAI_API_KEY")
        if isinstance(exc, oa.NotFoundError):
            return UserError(f"model {self.config.model!r} or the endpoint was not found at {where}",
                             "check --model, and that --base-url ends in /v1")
        return UserError(f"the LLM server refused the request: {_server_message(exc)}")


class ReplyTooLarge(UserError):
    """A reply over the size limit: not retried (the openai client passes errors that are not its own through)."""


def bounded_http_client(openai: Any, deadline: float, max_bytes: int) -> Any:
    """openai's default HTTP client, with the two bounds it lacks: `deadline` seconds for a whole request, reply
    included (the client's timeout holds for each read, so a server sending a byte a second never times out; past
    the deadline the reply is a timeout, which the openai client retries as any other), and `max_bytes` for a reply,
    which is read into memory whole."""
    base = openai.DefaultHttpxClient
    httpx = sys.modules[base.__mro__[1].__module__.split(".")[0]]  # httpx, or httpx2 for newer openai releases

    class BoundedStream(httpx.SyncByteStream):
        def __init__(self, inner: Any, request: Any, until: float):
            self.inner, self.request, self.until, self.size = inner, request, until, 0

        def __iter__(self):
            for chunk in self.inner:
                self.size += len(chunk)
                if self.size > max_bytes:
                    raise ReplyTooLarge(f"the LLM server's reply is larger than {max_bytes:,} bytes",
                                        f"check the server (--base-url), {limit_hint('reply_bytes')}")
                if time.monotonic() > self.until:
                    raise httpx.ReadTimeout(f"the reply took longer than {deadline:g} s", request=self.request)
                yield chunk

        def close(self) -> None:
            self.inner.close()

    class BoundedClient(base):
        def send(self, request: Any, *, stream: bool = False, **kwargs: Any) -> Any:
            until = time.monotonic() + deadline
            response = super().send(request, stream=True, **kwargs)
            response.stream = BoundedStream(response.stream, request, until)
            if not stream:
                try:
                    response.read()
                except BaseException:
                    response.close()
                    raise
            return response

    return BoundedClient(timeout=deadline)


def without_array_bounds(schema: Any) -> Any:
    """The schema with every minItems / maxItems removed."""
    if isinstance(schema, dict):
        return {k: without_array_bounds(v) for k, v in schema.items() if k not in ("minItems", "maxItems")}
    if isinstance(schema, list):
        return [without_array_bounds(v) for v in schema]
    return schema


def _content_of(response: Any) -> str:
    # Some servers answer an empty choices list instead of an error; treat it as an empty (invalid) reply.
    choices = getattr(response, "choices", None)
    return (choices[0].message.content or "") if choices else ""


def _finish_of(response: Any) -> str | None:
    choices = getattr(response, "choices", None)
    return getattr(choices[0], "finish_reason", None) if choices else None


def _usage_of(response: Any) -> dict[str, int] | None:
    usage = getattr(response, "usage", None)
    if usage is None:
        return None
    return {"prompt_tokens": int(usage.prompt_tokens or 0), "completion_tokens": int(usage.completion_tokens or 0)}


def _server_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(exc)


def _describe_failure(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    if status == 429:
        return "rate limited (429)"
    if status:
        return f"server error {status}"
    return type(exc).__name__.replace("API", "").replace("Error", " error").strip().lower()


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


def _fingerprint(text: str) -> str:
    """Replies that differ only in whitespace or key order are the same answer."""
    try:
        return json.dumps(extract_json(text), sort_keys=True)
    except ValueError:
        return " ".join(text.split())


def complete_json(client: LLMClient, messages: list[dict[str, str]], check: Callable[[Any], Any],
                  schema: dict[str, Any] | None, raw_path: Path, label: str, max_tries: int = 3,
                  schema_name: str = "response", max_tokens: int | None = None) -> Any:
    """Ask, validate with `check` (raises ValueError listing problems), and feed problems back to repair.

    A reply cut at `max_tokens` is not fed back (it would fill the context); the question is asked again with a
    request for a shorter answer. The same invalid answer twice ends the tries early: a repair that did not
    change the answer once will not change it the next time. On final failure every raw reply is written to
    `raw_path` and the conversation is dropped from the cache, so a rerun asks afresh instead of replaying the
    same bad answers.
    """
    conversation = list(messages)
    replies: list[tuple[str, str]] = []
    keys: list[str] = []
    seen: set[str] = set()
    repeated = False
    for attempt in range(max_tries):
        if attempt:
            client.usage.count("repairs")
        result = client.chat(conversation, schema=schema, schema_name=schema_name, max_tokens=max_tokens)
        keys.append(result.cache_key)
        fingerprint = _fingerprint(result.content)
        if result.finish_reason == "length":
            limit = f"max_tokens={result.max_tokens}" if result.max_tokens else "the server's length limit"
            problem = f"- the reply was cut off at {limit} before the JSON object was complete"
            conversation = _ask_shorter(messages, result.max_tokens)
        else:
            try:
                valid = check(extract_json(result.content))
                Path(raw_path).unlink(missing_ok=True)  # an earlier run's failed replies no longer apply
                return valid
            except ValueError as exc:
                problem = str(exc)
            conversation += [{"role": "assistant", "content": result.content},
                             {"role": "user", "content": prompt("repair", problems=problem)}]
        replies.append((result.content, problem))
        if fingerprint in seen:
            repeated = True
            break
        seen.add(fingerprint)
    for key in keys:
        client.forget(key)
    _save_raw(raw_path, label, replies)
    last = replies[-1][1].splitlines()[0].removeprefix("- ")
    cut = replies[-1][1].startswith("- the reply was cut off")
    hint = f"raw replies saved to {raw_path}; " + ("raise --max-tokens, or " if cut else "") + \
        "try again, use a stronger LLM (--llm-model)"
    if repeated:
        raise StructuredOutputError(
            f"{label}: the model gave the same invalid answer twice, so more repairs would not change it; "
            f"last problem: {last}", hint + ", or set --temperature above 0 so that a new answer can differ")
    raise StructuredOutputError(f"{label}: no valid answer after {len(replies)} tries; last problem: {last}",
                                hint + ", or raise --max-tries")


def _ask_shorter(messages: list[dict[str, str]], limit: int | None) -> list[dict[str, str]]:
    """The first question again, with a request to stay under the limit. Appended to the last user message
    rather than as a new turn: chat templates such as Gemma's insist that user and assistant turns alternate."""
    note = prompt("shorter", limit=f"{limit} tokens" if limit else "the server's length limit")
    return [*messages[:-1], {**messages[-1], "content": f"{messages[-1]['content']}\n\n{note}"}]


def _save_raw(path: Path, label: str, replies: list[tuple[str, str]]) -> None:
    parts = [f"# {label}: {len(replies)} invalid repl{'y' if len(replies) == 1 else 'ies'}\n"]
    for i, (content, problem) in enumerate(replies, 1):
        parts.append(f"\n===== try {i} =====\n--- problems ---\n{problem}\n--- raw reply ---\n{content}\n")
    atomic_write_text(Path(path), "".join(parts))
