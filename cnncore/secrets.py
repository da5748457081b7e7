"""Where an access key comes from, in one syntax for the server's flags and the client's headers:
a literal, `@FILE` (the file's content, trailing newline dropped) or `env:VARIABLE`, so a key need not
appear in `ps`, a shell history or a manifest."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_secret(raw: str, what: str) -> str:
    """The key `raw` refers to; ValueError naming `what` (e.g. the flag) when it is unreadable or empty."""
    if raw.startswith("@"):
        path = Path(raw[1:])
        try:
            value = path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"{what}: cannot read the key file {path}: {exc.strerror or exc}") from None
        source = f"key file {path}"
    elif raw.startswith("env:"):
        name = raw[4:]
        if name not in os.environ:
            raise ValueError(f"{what}: environment variable {name!r} (named by env:{name}) is not set")
        value, source = os.environ[name], f"environment variable {name}"
    else:
        value, source = raw, "value"
    if not value:
        raise ValueError(f"{what}: the {source} is empty")
    return value
