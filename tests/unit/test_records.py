"""The journal record codec: round trips, and corruption is always caught."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailfs.cachemgr.records import (
    HEADER,
    LAYOUT,
    Attrs,
    CorruptRecord,
    Op,
    Record,
    decode_stream,
    encode,
)

u64 = st.integers(min_value=0, max_value=2**63 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
attrs = st.builds(Attrs, u32, u32, u32, u32, u64, u64, u64, u64)


@st.composite
def records(draw: st.DrawFn) -> Record:
    op = draw(st.sampled_from(list(Op)))
    fields = []
    for kind in LAYOUT[op]:
        if kind == "q":
            fields.append(draw(u64))
        elif kind == "b":
            fields.append(draw(st.binary(max_size=300)))
        else:
            fields.append(draw(attrs))
    return Record(draw(u64), op, tuple(fields))


@given(st.lists(records(), max_size=20))
def test_round_trip(batch: list[Record]) -> None:
    data = b"".join(encode(r) for r in batch)
    assert list(decode_stream(data)) == batch


@given(st.lists(records(), min_size=1, max_size=5), st.data())
def test_torn_tail_yields_the_complete_prefix(batch: list[Record], data: st.DataObject) -> None:
    encoded = [encode(r) for r in batch]
    whole = b"".join(encoded)
    cut = data.draw(st.integers(min_value=0, max_value=len(whole) - 1))
    complete = 0
    total = 0
    for piece in encoded:
        if total + len(piece) > cut:
            break
        complete += 1
        total += len(piece)
    assert list(decode_stream(whole[:cut])) == batch[:complete]


@given(records(), st.data())
def test_any_flipped_byte_is_detected(record: Record, data: st.DataObject) -> None:
    encoded = bytearray(encode(record))
    position = data.draw(st.integers(min_value=4, max_value=len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(CorruptRecord):
        list(decode_stream(bytes(encoded)))


def test_oversized_length_is_refused() -> None:
    with pytest.raises(CorruptRecord):
        list(decode_stream(HEADER.pack(2**31, 0) + b"x" * 16))
