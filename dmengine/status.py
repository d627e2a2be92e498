"""SyncML DM status codes, alert codes and FUMO result codes (L0: imports nothing).

Names keep the spec's wording (PROTOCOL.md §5, §6, §9.4); every member has a one-line
description, available as ``member.description``.
"""
from __future__ import annotations

from enum import IntEnum


class _Described(IntEnum):
    """IntEnum whose members carry a description: ``NAME = (value, "description")``."""

    description: str

    def __new__(cls, value: int, description: str = "") -> "_Described":
        obj = int.__new__(cls, value)
        obj._value_ = value
        obj.description = description
        return obj


class StatusCode(_Described):
    IN_PROGRESS = 101, "In progress"
    OK = 200, "OK"
    ITEM_ADDED = 201, "Item added"
    ACCEPTED_FOR_PROCESSING = 202, "Accepted for processing"
    NON_AUTHORITATIVE_RESPONSE = 203, "Non-authoritative response"
    NO_CONTENT = 204, "No content"
    RESET_CONTENT = 205, "Reset content"
    PARTIAL_CONTENT = 206, "Partial content"
    CONFLICT_RESOLVED_WITH_MERGE = 207, "Conflict resolved with merge"
    CONFLICT_RESOLVED_CLIENT_WINS = 208, "Conflict resolved, client wins"
    CONFLICT_RESOLVED_WITH_DUPLICATE = 209, "Conflict resolved with duplicate"
    DELETE_WITHOUT_ARCHIVE = 210, "Delete without archive"
    ITEM_NOT_DELETED = 211, "Item not deleted"
    AUTHENTICATION_ACCEPTED = 212, "Authentication accepted"
    CHUNKED_ITEM_ACCEPTED = 213, "Chunked item accepted and buffered"
    OPERATION_CANCELLED = 214, "Operation cancelled"
    NOT_EXECUTED = 215, "Not executed"
    ATOMIC_ROLLBACK_OK = 216, "Atomic roll back OK"
    MULTIPLE_CHOICES = 300, "Multiple choices"
    MOVED_PERMANENTLY = 301, "Moved permanently"
    FOUND = 302, "Found"
    SEE_OTHER = 303, "See other"
    NOT_MODIFIED = 304, "Not modified (Confirm alert answered No)"
    USE_PROXY = 305, "Use proxy"
    BAD_REQUEST = 400, "Bad request"
    INVALID_CREDENTIALS = 401, "Invalid credentials"
    PAYMENT_REQUIRED = 402, "Payment required"
    FORBIDDEN = 403, "Forbidden"
    NOT_FOUND = 404, "Not found"
    COMMAND_NOT_ALLOWED = 405, "Command not allowed"
    OPTIONAL_FEATURE_NOT_SUPPORTED = 406, "Optional feature not supported"
    MISSING_CREDENTIALS = 407, "Missing credentials"
    REQUEST_TIMEOUT = 408, "Request timeout"
    CONFLICT = 409, "Conflict"
    GONE = 410, "Gone"
    SIZE_REQUIRED = 411, "Size required"
    INCOMPLETE_COMMAND = 412, "Incomplete command"
    REQUEST_ENTITY_TOO_LARGE = 413, "Request entity too large"
    URI_TOO_LONG = 414, "URI too long"
    UNSUPPORTED_MEDIA_TYPE = 415, "Unsupported media type or format"
    REQUESTED_SIZE_TOO_BIG = 416, "Requested size too big"
    RETRY_LATER = 417, "Retry later"
    ALREADY_EXISTS = 418, "Already exists"
    CONFLICT_RESOLVED_WITH_SERVER_DATA = 419, "Conflict resolved with server data"
    DEVICE_FULL = 420, "Device full"
    UNKNOWN_SEARCH_GRAMMAR = 421, "Unknown search grammar"
    BAD_CGI_SCRIPT = 422, "Bad CGI script"
    SOFT_DELETE_CONFLICT = 423, "Soft-delete conflict"
    SIZE_MISMATCH = 424, "Size mismatch"
    PERMISSION_DENIED = 425, "Permission denied"
    COMMAND_FAILED = 500, "Command failed"
    COMMAND_NOT_IMPLEMENTED = 501, "Command not implemented"
    BAD_GATEWAY = 502, "Bad gateway"
    SERVICE_UNAVAILABLE = 503, "Service unavailable"
    GATEWAY_TIMEOUT = 504, "Gateway timeout"
    DTD_VERSION_NOT_SUPPORTED = 505, "DTD version not supported"
    PROCESSING_ERROR = 506, "Processing error"
    ATOMIC_FAILED = 507, "Atomic failed"
    REFRESH_REQUIRED = 508, "Refresh required"
    RESERVED_509 = 509, "Reserved"
    DATA_STORE_FAILURE = 510, "Data store failure"
    SERVER_FAILURE = 511, "Server failure"
    SYNCHRONIZATION_FAILED = 512, "Synchronization failed"
    PROTOCOL_VERSION_NOT_SUPPORTED = 513, "Protocol version not supported"
    OPERATION_CANCELLED_ALREADY = 514, "Operation cancelled (already)"
    ATOMIC_ROLLBACK_FAILED = 516, "Atomic roll back failed"
    ATOMIC_RESPONSE_TOO_LARGE = 517, "Atomic response too large to fit"

    def is_success(self) -> bool:
        return 200 <= self < 300

    def is_error(self) -> bool:
        return self >= 400


def status_is_success(code: int) -> bool:
    """True for any 2xx code, including ones this table does not name."""
    return 200 <= code < 300


class AlertCode(_Described):
    DISPLAY = 1100, "Display text to the user"
    CONFIRM_OR_REJECT = 1101, "Ask the user to confirm or reject"
    TEXT_INPUT = 1102, "Ask the user for text"
    SINGLE_CHOICE = 1103, "Ask the user to pick one choice"
    MULTIPLE_CHOICE = 1104, "Ask the user to pick several choices"
    SERVER_INITIATED_MGMT = 1200, "Session answers a server notification"
    CLIENT_INITIATED_MGMT = 1201, "Session started by the client"
    NEXT_MESSAGE = 1222, "Request for the next message of a package"
    SESSION_ABORT = 1223, "Session abort"
    CLIENT_EVENT = 1224, "Client event"
    NO_END_OF_DATA = 1225, "End of data for chunked object not received"
    GENERIC_ALERT = 1226, "Generic alert"

    def is_ui(self) -> bool:
        return 1100 <= self <= 1104


class FumoState(_Described):
    IDLE = 10, "Idle / Start"
    DOWNLOAD_FAILED = 20, "Download failed"
    DOWNLOAD_PROGRESSING = 30, "Download progressing"
    DOWNLOAD_COMPLETE = 40, "Download complete"
    READY_TO_UPDATE = 50, "Ready to update"
    UPDATE_PROGRESSING = 60, "Update progressing"
    UPDATE_FAILED_HAVE_DATA = 70, "Update failed / have data"
    UPDATE_FAILED_NO_DATA = 80, "Update failed / no data"
    UPDATE_SUCCESSFUL_HAVE_DATA = 90, "Update successful / have data"
    UPDATE_SUCCESSFUL_NO_DATA = 100, "Update successful / no data"


class FumoResult(_Described):
    SUCCESSFUL = 200, "Successful"
    CLIENT_ERROR = 400, "Management client error"
    USER_CANCELLED = 401, "User cancelled"
    CORRUPTED_PACKAGE = 402, "Corrupted firmware update package"
    PACKAGE_MISMATCH = 403, "Package / device mismatch"
    FAILED_VALIDATION = 404, "Failed package validation"
    PACKAGE_NOT_ACCEPTABLE = 405, "Package not acceptable"
    DOWNLOAD_AUTH_FAILURE = 406, "Alternate download authentication failure"
    DOWNLOAD_TIMEOUT = 407, "Alternate download request time-out"
    NOT_IMPLEMENTED = 408, "Not implemented"
    UNDEFINED_ERROR = 409, "Undefined error"
    UPDATE_FAILED = 410, "Firmware update failed"
    MALFORMED_URL = 411, "Malformed or bad URL"
    DOWNLOAD_SERVER_ERROR = 500, "Alternate download server error / firmware update failed"
    DOWNLOAD_OUT_OF_MEMORY = 501, "Download failed, out of memory"
    UPDATE_OUT_OF_MEMORY = 502, "Update failed, out of memory"
    DOWNLOAD_NETWORK_FAILURE = 503, "Download failed, network"


def describe_fumo_result(code: int) -> str:
    """A sentence for any FUMO result code, including the vendor ranges (PROTOCOL.md §9.4)."""
    try:
        return FumoResult(code).description
    except ValueError:
        pass
    if 250 <= code <= 299:
        return "Successful, vendor specified"
    if 450 <= code <= 499:
        return "Client error, vendor specified"
    if 550 <= code <= 599:
        return "Alternate download server error, vendor specified"
    return "Unknown FUMO result code"


def fumo_result_is_success(code: int) -> bool:
    return 200 <= code < 300
