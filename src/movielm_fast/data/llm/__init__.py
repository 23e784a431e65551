"""LLM orchestration: movie plans from themes, MovieLLM question-answer pairs.

Everything talks to an OpenAI-compatible chat-completions endpoint through `client.LLMClient`, which owns
retries, the on-disk response cache and token accounting; `planner` and `qa` only build prompts and check
what comes back. Prompts are text templates in ``data/prompts``.
"""

from .client import LLMClient, LLMConfig, Usage, resolve_config

__all__ = ["LLMClient", "LLMConfig", "Usage", "resolve_config"]
