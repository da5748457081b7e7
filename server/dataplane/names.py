"""Model names and versions as clients send them, checked once where a request enters the server.

Names follow Triton's rules for a model repository: a model is a directory of the repository, so its
name is one path component (no '/' or '\\', not '.' or '..'), non-empty, and fits a directory name
(at most 255 bytes of UTF-8). Names starting with '.' are never models (the loader skips hidden
directories, where the export writer stages). Control characters are refused: they cannot be typed
back and corrupt logs. Versions are what the protocol's `model_version` string may hold: empty (the
server picks the latest) or a number of ASCII digits within int64, as Triton parses it; '²' and '①'
are digits to Python's str.isdigit, not version numbers.

Error messages quote what the client sent only through `server.errors.echo` (cut, repr'd), so a 10 KB
name can never make a status message larger than gRPC clients accept (their metadata limit is 8 KB).
"""

from __future__ import annotations

import unicodedata

from server.errors import echo, invalid

MAX_NAME_BYTES = 255  # NAME_MAX: the longest directory name
INT64_MAX = 2**63 - 1


def check_model_name(name: str) -> str:
    """`name` if it can name a model in a repository; INVALID_ARGUMENT saying why otherwise."""
    if not name:
        raise invalid("model name is empty")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise invalid(
            f"model name {echo(name)} is {size} bytes long; a model name is a directory name "
            f"of at most {MAX_NAME_BYTES} bytes"
        )
    if name in (".", "..") or "/" in name or "\\" in name:
        raise invalid(f"model name {echo(name)} is not a directory name: no '/', '\\', '.' or '..'")
    if name.startswith("."):
        raise invalid(f"model name {echo(name)} starts with '.': hidden directories are never models")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise invalid(f"model name {echo(name)} contains control characters")
    return name


def parse_version(version: str) -> int | None:
    """The protocol's `model_version`: None when empty (the latest), else its number; INVALID_ARGUMENT
    unless it is ASCII digits within int64."""
    if version == "":
        return None
    if not (version.isascii() and version.isdigit()):
        raise invalid(
            f"model version {echo(version)} is not a version number: expected ASCII digits "
            "(or empty for the latest version)"
        )
    significant = version.lstrip("0") or "0"
    if len(significant) > len(str(INT64_MAX)) or int(significant) > INT64_MAX:
        raise invalid(f"model version {echo(version)} is out of range: versions are at most {INT64_MAX}")
    return int(significant)
