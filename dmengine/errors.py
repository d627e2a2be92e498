"""One exception tree for the whole engine (L0).

Every error dmengine raises on purpose is a ``DmError``.  Errors that reach a peer carry
what to answer with: ``CodecError`` the byte offset, ``ProtocolError`` the SyncML status,
``ApiError`` the HTTP status and the field (``where``).
"""
from __future__ import annotations

from .status import StatusCode


class DmError(Exception):
    """Root of every error dmengine raises on purpose."""


class ConfigError(DmError):
    """A configuration value is missing or wrong; ``key`` names it."""

    def __init__(self, msg: str, *, key: str | None = None) -> None:
        super().__init__(msg)
        self.key = key


class LimitExceeded(DmError):
    """A configured limit was hit; ``limit`` names it and ``value`` is the bound."""

    def __init__(self, msg: str, *, limit: str, value: int | None = None) -> None:
        super().__init__(msg)
        self.limit = limit
        self.value = value


# --- L1 codec --------------------------------------------------------------------------


class CodecError(DmError):
    """Bytes that are not a valid SyncML DM message.

    ``offset`` is the byte offset where decoding stopped (None when encoding), ``expected``
    what the decoder wanted there.
    """

    def __init__(self, msg: str, *, offset: int | None = None, expected: str | None = None) -> None:
        where = f" at offset {offset}" if offset is not None else ""
        want = f" (expected {expected})" if expected else ""
        super().__init__(f"{msg}{where}{want}")
        self.reason = msg
        self.offset = offset
        self.expected = expected


# --- L2 protocol -----------------------------------------------------------------------


class ProtocolError(DmError):
    """The device broke SyncML DM.  ``status`` is the SyncML status we answer with."""

    def __init__(
        self,
        msg: str,
        *,
        status: int = StatusCode.BAD_REQUEST,
        cmd_ref: str | None = None,
    ) -> None:
        super().__init__(msg)
        self.status = StatusCode(status) if status in StatusCode._value2member_map_ else status
        self.cmd_ref = cmd_ref


class AuthError(ProtocolError):
    """Credentials missing (407) or wrong (401)."""

    def __init__(self, msg: str, *, status: int = StatusCode.INVALID_CREDENTIALS) -> None:
        super().__init__(msg, status=status)


# --- L3 I/O ------------------------------------------------------------------------------


class StoreError(DmError):
    """The store could not do what was asked."""


class NotFound(StoreError):
    """No record under that key; ``kind`` and ``key`` say which."""

    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key!r} not found")
        self.kind = kind
        self.key = key


class AlreadyExists(StoreError):
    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key!r} already exists")
        self.kind = kind
        self.key = key


class ValidationError(StoreError):
    """A record failed validation; ``where`` names the field (msgspec path such as ``$.msisdn``)."""

    def __init__(self, msg: str, *, where: str | None = None) -> None:
        super().__init__(msg)
        self.where = where


class GatewayError(DmError):
    """A notification gateway refused or failed a delivery; ``retryable`` says whether to try again."""

    def __init__(self, msg: str, *, retryable: bool = True) -> None:
        super().__init__(msg)
        self.retryable = retryable


# --- L4/L5 services and API ----------------------------------------------------------


class ServiceError(DmError):
    """A DMWSI operation cannot be carried out; ``code`` is the API error code."""

    code = "service_error"
    http_status = 409

    def __init__(self, msg: str, *, where: str | None = None) -> None:
        super().__init__(msg)
        self.where = where


class ApiError(DmError):
    """An API request is wrong.  Rendered as ``{"error": code, "message", "where"}``."""

    def __init__(self, msg: str, *, code: str = "bad_request", http_status: int = 400,
                 where: str | None = None) -> None:
        super().__init__(msg)
        self.code = code
        self.http_status = http_status
        self.where = where


# --- store (appended by the store work, issue 6) ------------------------------------------


class Conflict(StoreError):
    """An optimistic update lost: the record changed since it was read (``kind``, ``key``)."""

    def __init__(self, kind: str, key: object, msg: str | None = None) -> None:
        super().__init__(msg or f"{kind} {key!r} changed since it was read")
        self.kind = kind
        self.key = key


class InvalidTransition(StoreError):
    """A task or job state move that the state table does not allow."""

    def __init__(self, kind: str, key: object, from_state: object, to_state: object) -> None:
        super().__init__(f"{kind} {key!r}: {from_state} -> {to_state} is not a legal move")
        self.kind = kind
        self.key = key
        self.from_state = from_state
        self.to_state = to_state


class StoreClosed(StoreError):
    """The store was closed (or its writer died); nothing more can be written."""


class CorruptRecord(StoreError):
    """Stored bytes do not decode as the record they should be (``db``, ``key``)."""

    def __init__(self, db: str, key: bytes, detail: str) -> None:
        super().__init__(f"corrupt record in {db} at {key!r}: {detail}")
        self.db = db
        self.key = key


# --- content (appended by the content work, issue 7) ----------------------------------------


class ContentError(ServiceError):
    """Content cannot be stored or served as asked; ``where`` names the field."""

    code = "content_error"
    http_status = 400


class ContentTooLarge(ContentError):
    """An upload passed the size limit (``limit`` bytes); the partial file was removed."""

    code = "content_too_large"
    http_status = 413

    def __init__(self, received: int, limit: int) -> None:
        super().__init__(f"content larger than the limit max_size={limit} bytes "
                         f"(at least {received} bytes)", where="size")
        self.received = received
        self.limit = limit


class ContentMismatch(ContentError):
    """The upload does not match what was declared (``where`` = ``sha256`` or ``size``)."""

    code = "content_mismatch"
    http_status = 422


class NoContentFits(ContentError):
    """No stored package fits the device (capability / firmware version); ``where`` says why."""

    code = "no_content_fits"
    http_status = 404


# --- L2 session (appended by the session engine) ----------------------------------------


class CommandRejected(DmError):
    """``DmSession.queue()`` refused a command (wrong name, bad UI alert, session ended, queue full)."""

    def __init__(self, msg: str, *, handle: object = None) -> None:
        super().__init__(msg)
        self.handle = handle


class UnsupportedContentType(CodecError):
    """An HTTP body whose media type or charset no codec reads (answer HTTP 415).

    ``content_type`` is the header as received; ``what`` says which part is wrong
    (``"media type"`` or ``"charset"``).
    """

    def __init__(self, msg: str, *, content_type: str | None, what: str,
                 expected: str | None = None) -> None:
        super().__init__(msg, expected=expected)
        self.content_type = content_type
        self.what = what


class InvalidRequest(ServiceError):
    """A DMWSI request parameter is wrong (HTTP 400); ``where`` names it."""

    code = "invalid"
    http_status = 400


class UnknownResource(ServiceError):
    """A request names a device, task or content that does not exist (HTTP 404)."""

    code = "not_found"
    http_status = 404
