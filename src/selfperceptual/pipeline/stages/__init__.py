"""The stages of ``python -m selfperceptual``: a module each, with ``add_arguments``, ``run`` and
``PARAMS``, the params.yaml keys it reads (the DVC params of its stages; ``cli.main`` hands ``run``
a view of the scale block that raises on any other key)."""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path


@functools.cache
def _module_tree(name: str) -> ast.Module:
    """A stage module's syntax tree, read without importing it (a stage's imports take seconds)."""
    return ast.parse(Path(importlib.util.find_spec(f"{__name__}.{name}").origin).read_text())


def docstring(name: str) -> str:
    return ast.get_docstring(_module_tree(name))


def declared_params(name: str) -> tuple[str, ...] | None:
    """A stage module's ``PARAMS`` (None: they come from the spec each of its stages runs)."""
    for node in _module_tree(name).body:
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id == "PARAMS" for target in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"src/selfperceptual/pipeline/stages/{name}.py has no PARAMS")
