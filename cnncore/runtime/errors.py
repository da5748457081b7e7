"""The one error the runtime layer raises for a machine that lacks something."""

from __future__ import annotations


class RuntimeUnavailable(RuntimeError):
    """The runtime, or a part of it (an execution provider, OpenVINO itself), is not installed here.

    The message names what is missing and how to get it; callers that load models for others (the
    server) turn it into their own "cannot load this model" error, the rest let it through."""
