"""The errors that end a call with a gRPC status, for every MeshServe service.

Plain code (validation, the router's dispatch, the control plane's checks, the model manager)
raises one of these with a message a person can act on; `status_interceptor.py` turns it into the
status and trailers, once for every servicer. Anything else that escapes a servicer is a bug and
becomes INTERNAL (logged with its traceback), never UNKNOWN.
"""

from __future__ import annotations

import grpc

#: Trailer that carries a retry hint in milliseconds (clients and Envoy can read it).
RETRY_AFTER_TRAILER = "retry-after-ms"


class ServiceError(Exception):
    """A call ends with `code` and `message` (plus trailing metadata, if any)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_ms: int | None = None,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_ms is not None:
            trailers = (*trailers, (RETRY_AFTER_TRAILER, str(int(retry_after_ms))))
        self.trailers = trailers

    @staticmethod
    def of(code: grpc.StatusCode, message: str,
           trailers: tuple[tuple[str, str], ...] = ()) -> ServiceError:
        """The error class for `code` (e.g. an upstream status passed through unchanged)."""
        cls = _BY_CODE.get(code, ServiceError)
        err = cls(message, trailers=trailers)
        if cls is ServiceError:
            err.code = code
        return err

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}: {self.message!r})"


class InvalidArgument(ServiceError, ValueError):
    """The request can never succeed as written. A ValueError too, so plain checks read naturally."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """Retryable: this replica or the mesh cannot take the call now."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                              ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled,
                              PermissionDenied, Unauthenticated, OutOfRange, Internal)}
