"""Issue 18, mutmut on dmengine/content.py: byte ranges (RFC 7233) and media types resolved
against their edges, each answer compared whole."""
from __future__ import annotations

import pytest

from dmengine import content as C

R, U = C.ByteRange, C.UNSATISFIABLE


@pytest.mark.parametrize("header,size,want", [
    (None, 10, None),
    ("bytes=0-4", 10, R(0, 5)),
    ("Bytes = 2-", 10, R(2, 8)),                 # unit in any case, spaces around "="
    ("bytes=\t3 - 3 ", 10, R(3, 1)),
    ("bytes=5-100", 10, R(5, 5)),                # cut at the end
    ("bytes=9-9", 10, R(9, 1)),                  # the last byte
    ("bytes=10-", 10, U),                        # starts past the end
    ("bytes=10-20", 10, U),
    ("bytes=0-", 0, U),
    ("bytes=-3", 10, R(7, 3)),                   # suffix
    ("bytes=-10", 10, R(0, 10)),
    ("bytes=-11", 10, R(0, 10)),
    ("bytes=-0", 10, U),
    ("bytes=-5", 0, U),
    ("bytes=" + "9" * 40 + "-", 10, U),         # a position past any end
    ("bytes=-" + "9" * 40, 10, R(0, 10)),
    ("bytes=0-" + "9" * 40, 10, R(0, 10)),
    ("bytes=" + "0" * 30 + "1-2", 10, R(1, 2)),  # leading zeros are not "long"
    ("bytes=5-4", 10, None),                     # last < first: the header is ignored
    ("bytes=-", 10, None),
    ("bytes=a-b", 10, None),
    ("bytes=0-1,3-4", 10, None),                 # several ranges: the whole body
    ("bytes=0-1, ", 10, R(0, 2)),                # an empty element is not a range
    ("bytes=", 10, None),
    ("items=0-1", 10, None),
    ("bytes 0-1", 10, None),
])
def test_parse_range(header, size, want):
    assert C.parse_range(header, size) == want


def test_position_digits():
    assert C._position("0000") == 0
    assert C._position("1" * 18) == int("1" * 18)
    assert C._position("1" * 19) == C._PAST_ANY_END
    assert C._position("0" * 50 + "7") == 7


@pytest.mark.parametrize("value,problem", [
    ("application/octet-stream", None),
    ("application/vnd.oma.dd+xml; charset=utf-8", None),
    ('text/plain;a="b c";x=y', None),
    (7, "must be a string"),
    ("", "must not be empty"),
    ("a/" + "b" * C.MAX_MEDIA_TYPE, f"is longer than {C.MAX_MEDIA_TYPE} characters"),
    ("text/plain\r\nX-Injected: 1", "must be printable ASCII"),
    ("text/pläin", "must be printable ASCII"),
    ("textplain", "is not a media type (type/subtype, optionally ; name=value)"),
    ("text/plain; charset", "is not a media type (type/subtype, optionally ; name=value)"),
])
def test_media_type_problem(value, problem):
    assert C.media_type_problem(value) == problem


def test_media_type_length_limit_is_inclusive():
    at = "a/" + "b" * (C.MAX_MEDIA_TYPE - 2)
    assert len(at) == C.MAX_MEDIA_TYPE and C.media_type_problem(at) is None
    assert C.media_type_problem(at + "b") == f"is longer than {C.MAX_MEDIA_TYPE} characters"
