"""sidecar.etf: round trips (property-based), malformed input refused cleanly, and agreement with a
real Erlang VM (`erl` decodes what we encode and we decode what it encodes)."""
from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import etf
from sidecar.etf import Atom, DecodeError, EncodeError

# --- strategies --------------------------------------------------------------------------------------

_RESERVED = {"true", "false", "nil"}  # decode to True/False/None, not to Atom
atoms = st.text(st.characters(blacklist_categories=("Cs",)), max_size=255).filter(
    lambda s: s not in _RESERVED).map(Atom)
ints = st.one_of(st.integers(-300, 300), st.integers(-(2**31), 2**31 - 1), st.integers(-(2**2100), 2**2100))
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(atoms, ints, floats, st.binary(max_size=300), st.text(max_size=50), st.none(),
                    st.booleans())
keys = st.one_of(atoms, st.integers(), st.binary(max_size=20))


def containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(children, max_size=8),
        st.lists(children, max_size=8).map(tuple),
        st.dictionaries(keys, children, max_size=6),
    )


terms = st.recursive(scalars, containers, max_leaves=40)


def normal(term: Any) -> Any:
    """What a term decodes to: strings come back as binaries, everything else as itself."""
    if isinstance(term, Atom) or term is None or isinstance(term, (bool, int, float, bytes)):
        return term
    if isinstance(term, str):
        return term.encode()
    if isinstance(term, list):
        return [normal(t) for t in term]
    if isinstance(term, tuple):
        return tuple(normal(t) for t in term)
    if isinstance(term, dict):
        return {normal(k): normal(v) for k, v in term.items()}
    raise AssertionError(type(term))


def same(a: Any, b: Any) -> bool:
    """Equality that also tells atoms from binaries and ints from bools."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return a == b


# --- round trips -------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(terms)
def test_round_trip(term: Any) -> None:
    assert same(etf.decode(etf.encode(term)), normal(term))


@settings(max_examples=200, deadline=None)
@given(terms)
def test_every_truncation_and_any_trailing_byte_is_refused(term: Any) -> None:
    data = etf.encode(term)
    for cut in sorted({1, 2, len(data) // 2, len(data) - 1}):
        if 0 < cut < len(data):
            with pytest.raises(DecodeError):
                etf.decode(data[:cut])
    with pytest.raises(DecodeError, match="left after the term"):
        etf.decode(data + b"\x00")


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_decode_error(junk: bytes) -> None:
    # Only DecodeError may escape: never IndexError, struct.error, RecursionError, MemoryError.
    try:
        etf.decode(bytes([131]) + junk)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(terms, st.integers(0, 10_000), st.integers(0, 255))
def test_single_byte_corruption_never_crashes(term: Any, where: int, value: int) -> None:
    data = bytearray(etf.encode(term))
    data[1 + where % (len(data) - 1)] = value
    try:
        etf.decode(bytes(data))
    except DecodeError:
        pass


def test_known_encodings() -> None:
    # Bytes as Erlang writes them (checked by hand against term_to_binary in OTP 25).
    assert etf.encode(Atom("ok")) == b"\x83\x77\x02ok"
    assert etf.encode(1) == b"\x83\x61\x01"
    assert etf.encode(-1) == b"\x83\x62\xff\xff\xff\xff"
    assert etf.encode(2**40) == b"\x83\x6e\x06\x00" + (2**40).to_bytes(6, "little")
    assert etf.encode(1.5) == b"\x83\x46" + struct.pack(">d", 1.5)
    assert etf.encode("hé") == b"\x83\x6d\x00\x00\x00\x03h\xc3\xa9"
    assert etf.encode([]) == b"\x83\x6a"
    assert etf.encode((1, 2)) == b"\x83\x68\x02\x61\x01\x61\x02"
    assert etf.encode({}) == b"\x83\x74\x00\x00\x00\x00"
    assert etf.encode(None) == b"\x83\x77\x03nil"
    assert etf.decode(b"\x83\x6b\x00\x03\x01\x02\x03") == [1, 2, 3]        # STRING_EXT
    assert etf.decode(b"\x83\x64\x00\x03ab\xe9") == Atom("ab\u00e9")        # latin-1 ATOM_EXT
    assert etf.decode(b"\x83\x73\x04true") is True                          # SMALL_ATOM_EXT


# --- malformed input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b"", "at least 2 bytes"),
    (b"\x83", "at least 2 bytes"),
    (b"\x82\x61\x01", "version byte"),
    (b"\x83\x6d\xff\xff\xff\xff", "binary needs 4294967295 bytes"),
    (b"\x83\x6c\xff\xff\xff\xff\x6a", "claims 4294967295 elements"),
    (b"\x83\x69\xff\xff\xff\xff", "claims 4294967295 elements"),
    (b"\x83\x74\x7f\xff\xff\xff", "claims 2147483647 elements"),
    (b"\x83\x6c\x00\x00\x00\x01\x61\x01\x61\x02", "improper list"),
    (b"\x83\x58\x77\x01a" + bytes(12), "NEW_PID_EXT"),
    (b"\x83\x4d\x00\x00\x00\x01\x03\xff", "BIT_BINARY_EXT"),
    (b"\x83\x77\x02\xc3\x28", "not valid UTF-8"),
    (b"\x83\x74\x00\x00\x00\x02\x61\x01\x6a\x61\x01\x6a", "duplicate map key"),
    (b"\x83\x74\x00\x00\x00\x01\x6b\x00\x01\x05\x6a", "map key of type list"),
    (b"\x83\x6e\x01\x02\x05", "sign byte"),
    (b"\x83\x63" + b"x" * 31, "not a number"),
    (b"\x83\x01", "unknown tag 1"),
    (b"\x83\x50\x00\x00\x00\x10" + zlib.compress(b"\x61\x01"), "declared 16 bytes"),
    (b"\x83\x50\x00\x00\x00\x02" + b"garbage", "corrupt"),
])
def test_malformed_is_refused_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        etf.decode(data)


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    deep = b"\x83" + b"\x6c\x00\x00\x00\x01" * 100_000 + b"\x6a" * 100_001
    with pytest.raises(DecodeError, match="nested deeper"):
        etf.decode(deep)


def test_compression_bomb_is_bounded_by_the_declared_size() -> None:
    bomb = b"\x83\x50\x00\x00\x00\x05" + zlib.compress(b"\x6a" * 50_000_000)
    with pytest.raises(DecodeError, match="declared 5 bytes"):
        etf.decode(bomb)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "no Erlang float"),
    (float("inf"), "no Erlang float"),
    (object(), "cannot encode object"),
    ({1, 2}, "cannot encode set"),
    (Atom("x" * 256), "exceeds Erlang's 255"),
    ("\ud800", "not valid UTF-8"),
])
def test_unencodable_values_raise_encode_error(value: Any, message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        etf.encode(value)


def test_binaries_accept_buffer_types() -> None:
    assert etf.decode(etf.encode(bytearray(b"ab"))) == b"ab"
    assert etf.decode(etf.encode(memoryview(b"abcd")[1:3])) == b"bc"
    assert etf.decode(memoryview(etf.encode([1, 2]))) == [1, 2]


@given(terms)
def test_encode_parts_concatenate_to_encode(term: Any) -> None:
    assert b"".join(etf.encode_parts(term)) == etf.encode(term)


def test_encode_parts_pass_a_big_binary_through_uncopied() -> None:
    big = bytes(1 << 20)
    parts = etf.encode_parts((Atom("ok"), 7, {Atom("data"): big, Atom("n"): 1}))
    assert any(part is big for part in parts)  # the writer sends it as it is, no 1 MB join
    assert len(parts) == 3  # the small pieces before and after it are joined


# --- against a real Erlang VM ------------------------------------------------------------------------

ERL_ECHO = r"""
{ok, In} = file:read_file(hd(init:get_plain_arguments())),
Echo = fun Loop(<<N:32, T:N/binary, Rest/binary>>, Acc) ->
               B = term_to_binary(binary_to_term(T)),
               Loop(Rest, [<<(byte_size(B)):32, B/binary>> | Acc]);
           Loop(<<>>, Acc) -> lists:reverse(Acc)
       end,
Z = term_to_binary({compressed, lists:seq(1, 300), <<0:8000>>}, [compressed]),
ok = file:write_file(hd(init:get_plain_arguments()) ++ ".out", [Echo(In, []), <<(byte_size(Z)):32, Z/binary>>]),
halt().
"""


def _frames(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from(">I", data, i)
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


@settings(max_examples=1, deadline=None)
@given(batch=st.lists(terms, min_size=150, max_size=150))
def test_erlang_reads_what_we_write_and_we_read_what_it_writes(tmp_path_factory, batch: list[Any]) -> None:
    if shutil.which("erl") is None:
        pytest.fail("`erl` is missing: install Debian's elixir package (apt-get install -y elixir)")
    path = tmp_path_factory.mktemp("etf") / "terms.bin"
    encoded = [etf.encode(t) for t in batch]
    path.write_bytes(b"".join(struct.pack(">I", len(e)) + e for e in encoded))
    run = subprocess.run(["erl", "-noshell", "-eval", ERL_ECHO, "-extra", str(path)], timeout=60,
                         capture_output=True, text=True, cwd=path.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    echoed = _frames((path.parent / "terms.bin.out").read_bytes())
    assert len(echoed) == len(batch) + 1
    for term, back in zip(batch, echoed[:len(batch)], strict=True):
        assert same(etf.decode(back), normal(term))
    assert etf.decode(echoed[-1]) == (Atom("compressed"), list(range(1, 301)), bytes(1000))


# --- what could not be sent back, bounds on inflation, the id of a refused frame ----------------------

@pytest.mark.parametrize("data, message", [
    (b"\x83\x46" + struct.pack(">d", float("nan")), "no Erlang form"),
    (b"\x83\x46" + struct.pack(">d", float("-inf")), "no Erlang form"),
    (b"\x83\x63" + b"inf".ljust(31, b"\x00"), "no Erlang form"),
    (b"\x83\x76\x01\x2c" + b"a" * 300, "atom of 300 characters exceeds Erlang's 255"),
], ids=["nan", "-inf", "FLOAT_EXT inf", "long atom"])
def test_what_erlang_cannot_hold_is_refused_on_decode(data: bytes, message: str) -> None:
    """Such a term could never be echoed back (encode refuses it), so it is refused on the way in."""
    with pytest.raises(DecodeError, match=message):
        etf.decode(data)


def test_decode_prefix_reads_the_id_of_a_frame_that_does_not_decode() -> None:
    pid = b"\x58\x77\x0dnonode@nohost" + b"\x00" * 12  # NEW_PID_EXT
    frame = b"\x83\x68\x04" + etf.encode(Atom("call"))[1:] + etf.encode(7)[1:] + pid + b"\x6a"
    with pytest.raises(DecodeError, match="PID"):
        etf.decode(frame)
    assert etf.decode_prefix(frame, 2) == (Atom("call"), 7)
    compressed = b"\x83\x50" + struct.pack(">I", len(frame) - 1) + zlib.compress(frame[1:])
    assert etf.decode_prefix(compressed, 2) == (Atom("call"), 7)
    with pytest.raises(DecodeError, match="not a tuple"):
        etf.decode_prefix(etf.encode([1, 2]), 2)
    with pytest.raises(DecodeError, match="no Erlang form"):  # the id itself is what cannot be read
        etf.decode_prefix(b"\x83\x68\x02\x77\x05bogus\x46" + struct.pack(">d", float("nan")), 2)


def test_a_compressed_term_declaring_more_than_the_limit_is_refused_before_inflating() -> None:
    bomb = b"\x83\x50" + struct.pack(">I", 256 << 20) + zlib.compress(b"\x6d" + struct.pack(">I", (256 << 20) - 5)
                                                                     + bytes((256 << 20) - 5))
    assert len(bomb) < 300_000  # ~255 KB on the wire
    with pytest.raises(DecodeError, match="over the 1048576-byte limit"):
        etf.decode(bomb, max_inflated=1 << 20)


def test_inflating_costs_the_inflated_size_once() -> None:
    import tracemalloc

    size = 32 << 20
    term = b"\x6d" + struct.pack(">I", size - 5) + bytes(size - 5)
    frame = b"\x83\x50" + struct.pack(">I", size) + zlib.compress(term)
    tracemalloc.start()
    try:
        value = etf.decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(value) == size - 5
    # the inflated buffer plus the decoded binary: twice the size, not three times (a copy behind a version byte)
    assert peak < 2.3 * size, f"peak {peak / size:.2f} x the inflated size"
