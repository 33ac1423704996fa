"""QEMU's QDict iteration order, for checks whose first failure QEMU reports.

QEMU checks a QMP request's members while iterating its QDict (``qdict_first`` /
``qdict_next``), so when two members are wrong, the one reported is the first in that
order, not in the input's. A QDict is 512 buckets indexed by ``tdb_hash(key) % 512``,
walked from bucket 0 up; a bucket is a list that new keys are pushed onto the head of,
so within a bucket the latest key comes first. Checked against QEMU 7.2: ``exec-oob``
(bucket 162) always clashes with ``execute`` (299), whatever the input order.
"""

from __future__ import annotations

from collections.abc import Iterable

QDICT_BUCKET_MAX = 512


def tdb_hash(name: str) -> int:
    """QEMU's ``tdb_hash`` (qobject/qdict.c) of a key's UTF-8 bytes."""
    data = name.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: Iterable[str]) -> list[str]:
    """``keys`` (in insertion order, as a JSON object's first occurrences) in QDict order."""
    indexed = list(enumerate(keys))
    indexed.sort(key=lambda ik: (tdb_hash(ik[1]) % QDICT_BUCKET_MAX, -ik[0]))
    return [k for _, k in indexed]
