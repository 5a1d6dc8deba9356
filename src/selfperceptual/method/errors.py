"""What the method raises when what it is given does not fit. The command line (and a notebook)
decides how to say it: each error names the input it is about in the method's terms, never a flag."""

from __future__ import annotations

from pathlib import Path


class MethodError(Exception):
    """Base of the method's errors."""


class UnknownObjective(MethodError, ValueError):
    """No objective of that name is registered."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown objective {name!r}; the registered ones are {', '.join(known)}")
        self.name, self.known = name, known


class InputError(MethodError):
    """An input of an objective (``input``: its name, e.g. "perceptual") is missing or does not fit;
    ``path`` is the folder or file it was read from, when there is one."""

    def __init__(self, input: str, problem: str, path: Path | str | None = None):
        super().__init__(f"{input}{f' {path}' if path is not None else ''}: {problem}")
        self.input, self.problem, self.path = input, problem, path


class ModelMismatch(InputError):
    """An input network that must be a copy of the model being trained (SP's f*) is not."""


class SettingError(MethodError):
    """A setting of an objective (``setting``: its name in the objective's settings) cannot be used."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting}: {problem}")
        self.setting, self.problem = setting, problem


class MissingComponent(MethodError):
    """A model or file the method needs is not where it was said to be."""
