"""The data wing: everything that is not the render engine.

The LLM client and its prompt templates (`llm`, `prompts/`), `make` (theme -> plans -> frames -> QA -> dataset),
question-answer pairs, the dataset export (`dataset`), `evaluate` and the HTML `gallery`. It uses the engine; the
render core never imports it (import-linter's layers contract in pyproject.toml).
"""
