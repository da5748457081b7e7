"""Errors that carry the gRPC status they should be answered with.

Raised anywhere below the service (validation, batcher, repository); the service turns them into
`context.abort(code, message)`, so status codes are decided where the failure is understood.
"""
from __future__ import annotations

import grpc


class InferError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> InferError:
    return InferError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> InferError:
    return InferError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> InferError:
    return InferError(grpc.StatusCode.UNAVAILABLE, message)
