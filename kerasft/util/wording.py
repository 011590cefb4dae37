"""How an error message names an option: as the user gave it.

The Python API takes keywords (`text_column="title"`, `skip_invalid=True`); the command line takes
flags (`--text-column title`, `--skip-invalid`). Messages raised by code both paths share spell
the option with `option()`, and `kerasft.cli` runs its commands inside `command_line()`, so a user
of either reads the words they type.

Example:
    >>> option("skip_invalid", True)
    'skip_invalid=True'
    >>> with command_line():
    ...     option("skip_invalid", True), option("header", False), option("text_column")
    ('--skip-invalid', '--no-header', '--text-column TEXT_COLUMN')
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_COMMAND_LINE = contextvars.ContextVar("kerasft_command_line", default=False)


def on_command_line() -> bool:
    """Whether messages raised now are read on the command line (inside `command_line()`)."""
    return _COMMAND_LINE.get()


def option(name: str, value: object = ...) -> str:
    """The option `name` (a keyword) set to `value`, spelt for the caller.

    Args:
        name: the Python keyword (`"text_column"`); its flag is `--text-column`.
        value: the value to show; `...` shows a placeholder. On the command line a boolean is
            the flag alone (`--skip-invalid`) or its `--no-` form for False (`--no-header`).

    Returns:
        `name=value` for Python callers, the flag (and value) inside `command_line()`.
    """
    if not on_command_line():
        return f"{name}=..." if value is ... else f"{name}={value!r}"
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    shown = name.upper() if value is ... else value  # argparse's metavar
    return f"--{flag} {shown}"


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Messages raised inside name options as command-line flags."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)
