"""kvtier's errors: one exception class per status code, all subclasses of :class:`Error`.

The compiled module raises them through :func:`make_error`; each carries the status code's name
(``code``) and the message kvtier (or kvtierd) gave (``message``).
"""

from __future__ import annotations


class Error(Exception):
    """A kvtier call failed. ``code`` is the status code's name, ``message`` the reason."""

    code: str = "unknown"

    def __init__(self, message: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class InvalidArgument(Error, ValueError):
    """The input is malformed: a bad size, dtype, device, layout or value."""
    code = "invalid_argument"


class NotFound(Error, LookupError):
    code = "not_found"


class AlreadyExists(Error):
    code = "already_exists"


class LayoutMismatch(Error):
    """The KV layout differs from the store's."""
    code = "layout_mismatch"


class Collision(Error):
    code = "collision"


class Busy(Error):
    code = "busy"


class ResourceExhausted(Error):
    """A tier, queue or window is full: back-pressure."""
    code = "resource_exhausted"


class IoError(Error, OSError):
    code = "io_error"


class ChecksumMismatch(Error):
    """Stored bytes failed their checksum; the blocks are treated as a miss from now on."""
    code = "checksum_mismatch"


class Cancelled(Error):
    code = "cancelled"


class Unavailable(Error, ConnectionError):
    """No daemon listens, the daemon went away, or the store is closed."""
    code = "unavailable"


class PermissionDenied(Error, PermissionError):
    """This identity may not use that tenant (or do that)."""
    code = "permission_denied"


class ProtocolError(Error):
    code = "protocol_error"


class Internal(Error):
    """A broken invariant inside kvtier: a bug."""
    code = "internal"


_BY_CODE: dict[str, type[Error]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, LayoutMismatch, Collision, Busy,
                ResourceExhausted, IoError, ChecksumMismatch, Cancelled, Unavailable,
                PermissionDenied, ProtocolError, Internal)
}


def error_class(code: str) -> type[Error]:
    """The exception class of a status code's name (``Error`` for an unknown one)."""
    return _BY_CODE.get(code, Error)


def make_error(code: str, message: str) -> Error:
    """An exception for a status: what the compiled module raises."""
    return error_class(code)(message, code)
