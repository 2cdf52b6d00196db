"""Request ids: UUIDv7 (RFC 9562, section 5.7), the ``X-AIBridge-Request-Id`` of each request and
the public ``id`` of its interception record.

Version 7 rather than 4 because the id is a key of the store: the interceptions' ``request_id``
index and the prompt, tool-call and thought tables are keyed by it. Random (v4) keys land on a
random page of each of those B-trees, so a batch of 500 records dirtied some 2,600 pages (10 MB
of write-ahead log) and cost about 60 ms of CPU; time-ordered keys append to the same few pages
(about 3 MB, 26 ms; ``python -m bench.store_writes``). The id reveals when the request started,
to the millisecond, which the record and the logs already say.
"""

from __future__ import annotations

import os
import time

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0x2 << 62
_VERSION_BITS = 0xF << 76
_VARIANT_BITS = 0x3 << 62


def new_request_id() -> str:
    """A UUIDv7 as text (``0190c2a4-7b1e-7d3a-9f10-2c4e6a8b0d1f``): 48 bits of Unix time in
    milliseconds, then 74 random bits; ids made in a later millisecond sort after."""
    milliseconds = time.time_ns() // 1_000_000
    value = (milliseconds & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10))
    value = value & ~(_VERSION_BITS | _VARIANT_BITS) | _VERSION_7 | _VARIANT_RFC
    text = f"{value:032x}"  # what str(uuid.UUID(int=value)) gives, without the object
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
