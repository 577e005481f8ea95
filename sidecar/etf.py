"""Erlang External Term Format (version 131): the terms an Elixir VM exchanges with `serve --stdio`.

Written here rather than taken from PyPI: the maintained candidates (`erlang-py`, `erlpack`) encode
Python `str` as an Erlang charlist (Elixir strings are binaries), wrap every binary and list in their
own classes, and do not bound lengths or nesting against the buffer, so a malformed frame could make
them allocate or recurse without limit. This codec does exactly what the port protocol needs.

Python <-> Erlang:

==========================  ==========================================================
Python                      Erlang / Elixir
==========================  ==========================================================
`Atom("ok")`                atom `:ok` (UTF-8; `ATOM_EXT`/`SMALL_ATOM_EXT` latin-1 decoded too)
True / False / None         atoms `true` / `false` / `nil`
int                         small / 32-bit integer, or bignum (SMALL/LARGE_BIG_EXT)
float                       `NEW_FLOAT_EXT` (also `FLOAT_EXT` on decode); NaN/inf refused both ways
bytes                       binary (str, bytearray and memoryview encode as binaries too)
list                        list (`STRING_EXT`, Erlang's compact list of bytes, decodes to a list
                            of ints); improper lists are refused
tuple                       tuple
dict                        map
==========================  ==========================================================

Pids, ports, references, funs and bitstrings are refused with `DecodeError`: the protocol never uses
them; so are atoms longer than 255 characters and non-finite floats, which no Erlang VM produces and
which could not be sent back. Decoding never trusts a length: every count is checked against the
bytes left before anything is allocated, nesting is bounded, a compressed term inflates only up to
`max_inflated` bytes (as the stream really inflates, into one buffer), and any malformed input raises
`DecodeError` (never IndexError, RecursionError or MemoryError). `decode_prefix` reads the first
elements of a tuple whose later elements do not decode, so a reply can still name the request's id.
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Any

__all__ = ["Atom", "EtfError", "DecodeError", "EncodeError", "encode", "decode", "decode_prefix", "VERSION",
           "MAX_INFLATED"]

VERSION = 131

# Tags (erts/emulator/beam/external.h).
NEW_FLOAT_EXT = 70
BIT_BINARY_EXT = 77
COMPRESSED = 80
SMALL_INTEGER_EXT = 97
INTEGER_EXT = 98
FLOAT_EXT = 99
ATOM_EXT = 100
SMALL_TUPLE_EXT = 104
LARGE_TUPLE_EXT = 105
NIL_EXT = 106
STRING_EXT = 107
LIST_EXT = 108
BINARY_EXT = 109
SMALL_BIG_EXT = 110
LARGE_BIG_EXT = 111
SMALL_ATOM_EXT = 115
MAP_EXT = 116
ATOM_UTF8_EXT = 118
SMALL_ATOM_UTF8_EXT = 119

# Tags we recognise but refuse, named in the error so a user sees what was sent.
_REFUSED = {
    82: "ATOM_CACHE_REF", 88: "NEW_PID_EXT", 89: "NEW_PORT_EXT", 90: "NEWER_REFERENCE_EXT",
    101: "REFERENCE_EXT", 102: "PORT_EXT", 103: "PID_EXT", 112: "NEW_FUN_EXT", 113: "EXPORT_EXT",
    114: "NEW_REFERENCE_EXT", 117: "FUN_EXT", 120: "V4_PORT_EXT", 121: "LOCAL_EXT",
    BIT_BINARY_EXT: "BIT_BINARY_EXT (a bitstring that is not a whole number of bytes)",
}

MAX_DEPTH = 256          # nesting of lists/tuples/maps; our protocol needs < 10
MAX_ATOM_CHARS = 255     # Erlang's own limit
MAX_INFLATED = 64 << 20  # default bound of a compressed term's inflated size
_INFLATE_CHUNK = 1 << 20
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_F64 = struct.Struct(">d")


class Atom(str):
    """An Erlang atom. Equal to the plain string of its name, but encoded as an atom, not a binary."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"


class EtfError(ValueError):
    """Base of this module's errors."""


class DecodeError(EtfError):
    """The bytes are not a term this codec accepts; `offset` is where decoding stopped."""

    def __init__(self, message: str, offset: int = -1) -> None:
        super().__init__(message if offset < 0 else f"{message} (at byte {offset})")
        self.offset = offset


class EncodeError(EtfError):
    """The Python value has no Erlang form here (unsupported type, NaN, atom too long, ...)."""


# ---------------------------------------------------------------------------------------------------
# Encoding


def encode(term: Any) -> bytes:
    """The external format of `term`, version byte included (what `:erlang.binary_to_term/1` reads)."""
    return b"".join(encode_parts(term))


# A binary at least this long stays a part of its own in `encode_parts` (not copied into a join).
_OWN_PART_BYTES = 64 * 1024


def encode_parts(term: Any) -> list[bytes]:
    """`encode(term)` as pieces whose concatenation is the encoding, for a writer with writev:
    big binaries (an inline tensor's bytes) are passed through as they are instead of being copied
    into one joined frame; the small pieces between them are joined (few iovecs per frame)."""
    pieces: list[bytes] = [bytes((VERSION,))]
    _encode(term, pieces, 0)
    parts: list[bytes] = []
    run: list[bytes] = []
    for piece in pieces:
        if len(piece) >= _OWN_PART_BYTES:
            if run:
                parts.append(b"".join(run))
                run = []
            parts.append(piece)
        else:
            run.append(piece)
    if run:
        parts.append(b"".join(run))
    return parts


def _encode(term: Any, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise EncodeError(f"term nested deeper than {MAX_DEPTH}")
    # The exact types of the protocol's terms first (one type() per term on the hot path), then
    # subclasses and other buffers. Order matters below: bool before int (bool is an int), Atom
    # before str (Atom is a str).
    kind = type(term)
    if kind is Atom:
        cached = _ATOM_BYTES.get(term)
        if cached is None:
            cached = _atom_bytes(term)
            if len(_ATOM_BYTES) < _ATOM_CACHE_MAX:
                _ATOM_BYTES[term] = cached
        out.append(cached)
    elif kind is str:
        try:
            data = term.encode("utf-8")
        except UnicodeEncodeError as e:
            raise EncodeError(f"string is not valid UTF-8: {e}") from None
        out.append(_BINARY_HEAD + _U32.pack(len(data)))
        out.append(data)
    elif kind is int:
        out.append(_SMALL_INTS[term] if 0 <= term < 256 else _int_bytes(term))
    elif kind is dict:
        out.append(_MAP_HEAD + _U32.pack(len(term)))
        for key, value in term.items():
            _encode(key, out, depth + 1)
            _encode(value, out, depth + 1)
    elif kind is list:
        if term:
            out.append(_LIST_HEAD + _U32.pack(len(term)))
            for item in term:
                _encode(item, out, depth + 1)
        out.append(_NIL)
    elif kind is tuple:
        n = len(term)
        out.append(bytes((SMALL_TUPLE_EXT, n)) if n < 256 else bytes((LARGE_TUPLE_EXT,)) + _U32.pack(n))
        for item in term:
            _encode(item, out, depth + 1)
    elif kind is bytes:
        if len(term) > 0xFFFFFFFF:
            raise EncodeError(f"binary of {len(term)} bytes exceeds the 4 GiB limit of BINARY_EXT")
        out.append(_BINARY_HEAD + _U32.pack(len(term)))
        out.append(term)
    elif term is None:
        out.append(b"\x77\x03nil")
    elif term is True:
        out.append(b"\x77\x04true")
    elif term is False:
        out.append(b"\x77\x05false")
    elif isinstance(term, Atom):
        out.append(_atom_bytes(term))
    elif isinstance(term, int):
        out.append(_int_bytes(int(term)))
    elif isinstance(term, float):
        if not math.isfinite(term):
            raise EncodeError(f"{term!r} has no Erlang float form")
        out.append(bytes((NEW_FLOAT_EXT,)) + _F64.pack(term))
    elif isinstance(term, (bytes, bytearray, memoryview)):
        n = term.nbytes if isinstance(term, memoryview) else len(term)
        if n > 0xFFFFFFFF:
            raise EncodeError(f"binary of {n} bytes exceeds the 4 GiB limit of BINARY_EXT")
        out.append(_BINARY_HEAD + _U32.pack(n))
        out.append(term if isinstance(term, bytes) else bytes(term))
    elif isinstance(term, str):
        _encode(str(term), out, depth)
    elif isinstance(term, tuple):
        _encode(tuple(term), out, depth)
    elif isinstance(term, list):
        _encode(list(term), out, depth)
    elif isinstance(term, dict):
        _encode(dict(term), out, depth)
    else:
        raise EncodeError(f"cannot encode {type(term).__name__} as an Erlang term")


_BINARY_HEAD = bytes((BINARY_EXT,))
_MAP_HEAD = bytes((MAP_EXT,))
_LIST_HEAD = bytes((LIST_EXT,))
_NIL = bytes((NIL_EXT,))
_SMALL_INTS = [bytes((SMALL_INTEGER_EXT, i)) for i in range(256)]
# Encoded atoms by name, and decoded atoms by their bytes: the protocol uses a few dozen, over and
# over. Bounded, so that a peer sending endless fresh atoms cannot grow them.
_ATOM_CACHE_MAX = 4096
_ATOM_BYTES: dict[str, bytes] = {}


def _atom_bytes(name: str) -> bytes:
    if len(name) > MAX_ATOM_CHARS:
        raise EncodeError(f"atom of {len(name)} characters exceeds Erlang's {MAX_ATOM_CHARS}")
    try:
        data = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EncodeError(f"atom name is not valid UTF-8: {e}") from None
    if len(data) < 256:
        return bytes((SMALL_ATOM_UTF8_EXT, len(data))) + data
    return bytes((ATOM_UTF8_EXT,)) + _U16.pack(len(data)) + data


def _int_bytes(value: int) -> bytes:
    if 0 <= value < 256:
        return bytes((SMALL_INTEGER_EXT, value))
    if -(1 << 31) <= value < (1 << 31):
        return bytes((INTEGER_EXT,)) + _I32.pack(value)
    magnitude = abs(value)
    digits = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
    sign = 1 if value < 0 else 0
    if len(digits) < 256:
        return bytes((SMALL_BIG_EXT, len(digits), sign)) + digits
    return bytes((LARGE_BIG_EXT,)) + _U32.pack(len(digits)) + bytes((sign,)) + digits


# ---------------------------------------------------------------------------------------------------
# Decoding


def decode(data: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH,
           max_inflated: int = MAX_INFLATED) -> Any:
    """The term in `data` (which starts with the version byte and holds exactly one term)."""
    dec = _decoder(data, max_depth, max_inflated)
    term = dec.term(0)
    if dec.pos != dec.end:
        raise DecodeError(f"{dec.end - dec.pos} bytes left after the term", dec.pos)
    return term


def decode_prefix(data: bytes | bytearray | memoryview, count: int, *, max_depth: int = MAX_DEPTH,
                  max_inflated: int = MAX_INFLATED) -> tuple[Any, ...]:
    """The first `count` elements of the tuple in `data`, whatever follows them.

    For answering a frame that `decode` refused: `{:call, id, op, [pid]}` still yields
    `(Atom("call"), id)`. Raises DecodeError when the term is not a tuple or one of those elements
    does not decode.
    """
    dec = _decoder(data, max_depth, max_inflated)
    tag = dec._u8("tag")
    if tag not in (SMALL_TUPLE_EXT, LARGE_TUPLE_EXT):
        raise DecodeError(f"the term is not a tuple (tag {tag})", dec.pos - 1)
    n = dec._count("tuple", tag == LARGE_TUPLE_EXT, 1)
    return tuple(dec.term(1) for _ in range(min(n, count)))


def _decoder(data: bytes | bytearray | memoryview, max_depth: int, max_inflated: int) -> _Decoder:
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if len(view) < 2:
        raise DecodeError(f"a term needs at least 2 bytes, got {len(view)}", 0)
    if view[0] != VERSION:
        raise DecodeError(f"version byte is {view[0]}, expected {VERSION}", 0)
    if view[1] == COMPRESSED:
        return _Decoder(memoryview(_inflate(view, max_inflated)), 0, max_depth)
    return _Decoder(view, 1, max_depth)


def _inflate(view: memoryview, max_inflated: int) -> bytearray:
    """term_to_binary(T, [compressed]): a 4-byte uncompressed size, then a zlib stream.

    The declared size must be within `max_inflated`, and memory grows only as the stream really
    inflates (a small frame that lies about its size costs nothing), into one buffer that is
    decoded in place (not copied behind a version byte).
    """
    if len(view) < 6:
        raise DecodeError("compressed term is truncated", 2)
    size = _U32.unpack_from(view, 2)[0]
    if size > max_inflated:
        raise DecodeError(f"compressed term declares {size} bytes inflated, over the {max_inflated}-byte limit", 2)
    inflater = zlib.decompressobj()
    body = bytearray()
    pending: memoryview | bytes = view[6:]
    try:
        while len(body) <= size and not inflater.eof:
            piece = inflater.decompress(pending, min(_INFLATE_CHUNK, size + 1 - len(body)))
            pending = inflater.unconsumed_tail
            if not piece and not pending:
                break  # the stream ended early
            body += piece
    except zlib.error as e:
        raise DecodeError(f"compressed term is corrupt: {e}", 6) from None
    if len(body) != size or inflater.unconsumed_tail or not inflater.eof:
        raise DecodeError(f"compressed term does not inflate to its declared {size} bytes", 6)
    return body


class _Decoder:
    __slots__ = ("data", "pos", "end", "max_depth")

    def __init__(self, data: memoryview, pos: int, max_depth: int) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data)
        self.max_depth = max_depth

    def _need(self, n: int, what: str) -> int:
        """Claims `n` bytes, returning where they start; refuses lengths beyond the buffer."""
        start = self.pos
        if n > self.end - start:
            raise DecodeError(f"{what} needs {n} bytes but only {self.end - start} are left", start)
        self.pos = start + n
        return start

    def _u8(self, what: str) -> int:
        return self.data[self._need(1, what)]

    def _u16(self, what: str) -> int:
        value: int = _U16.unpack_from(self.data, self._need(2, what))[0]
        return value

    def _u32(self, what: str) -> int:
        value: int = _U32.unpack_from(self.data, self._need(4, what))[0]
        return value

    def _count(self, what: str, wide: bool, min_bytes_each: int) -> int:
        n = self._u32(what) if wide else self._u8(what)
        # Every element takes at least min_bytes_each bytes: a count larger than that is a lie,
        # refused before we build anything of its size.
        if n * min_bytes_each > self.end - self.pos:
            raise DecodeError(f"{what} claims {n} elements but only {self.end - self.pos} bytes are left",
                              self.pos)
        return n

    def term(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise DecodeError(f"term nested deeper than {self.max_depth}", self.pos)
        data, at = self.data, self.pos
        # Fast paths for what the protocol sends most: small atoms, small integers, binaries, small
        # tuples and maps, read with their bounds checked here; everything else (and every error,
        # with its message) below.
        if at + 2 <= self.end:
            tag = data[at]
            if tag == SMALL_ATOM_UTF8_EXT:
                n = data[at + 1]
                if at + 2 + n <= self.end:
                    raw = bytes(data[at + 2:at + 2 + n])
                    atom = _ATOMS.get(raw, _MISS)
                    if atom is not _MISS:
                        self.pos = at + 2 + n
                        return atom
            elif tag == SMALL_INTEGER_EXT:
                self.pos = at + 2
                return data[at + 1]
            elif tag == SMALL_TUPLE_EXT:
                n = data[at + 1]
                if n <= self.end - at - 2:
                    self.pos = at + 2
                    return tuple([self.term(depth + 1) for _ in range(n)])
        tag = self._u8("tag")
        if tag == SMALL_INTEGER_EXT:
            return self._u8("small integer")
        if tag == INTEGER_EXT:
            return _I32.unpack_from(self.data, self._need(4, "integer"))[0]
        if tag in (SMALL_ATOM_UTF8_EXT, ATOM_UTF8_EXT, SMALL_ATOM_EXT, ATOM_EXT):
            return self._atom(tag)
        if tag == BINARY_EXT:
            n = self._u32("binary length")
            start = self._need(n, "binary")
            return bytes(self.data[start:start + n])
        if tag in (SMALL_TUPLE_EXT, LARGE_TUPLE_EXT):
            n = self._count("tuple", tag == LARGE_TUPLE_EXT, 1)
            return tuple(self.term(depth + 1) for _ in range(n))
        if tag == NIL_EXT:
            return []
        if tag == LIST_EXT:
            n = self._count("list", True, 1)
            items = [self.term(depth + 1) for _ in range(n)]
            tail_at = self.pos
            if self._u8("list tail") != NIL_EXT:
                raise DecodeError("improper list (tail is not []) is not supported", tail_at)
            return items
        if tag == STRING_EXT:
            n = self._u16("string length")
            start = self._need(n, "string")
            return list(self.data[start:start + n])
        if tag == MAP_EXT:
            return self._map(depth)
        if tag == NEW_FLOAT_EXT:
            return _finite(_F64.unpack_from(self.data, self._need(8, "float"))[0], at)
        if tag in (SMALL_BIG_EXT, LARGE_BIG_EXT):
            n = self._u32("bignum length") if tag == LARGE_BIG_EXT else self._u8("bignum length")
            sign = self._u8("bignum sign")
            start = self._need(n, "bignum")
            value = int.from_bytes(self.data[start:start + n], "little")
            if sign > 1:
                raise DecodeError(f"bignum sign byte is {sign}, expected 0 or 1", start - 1)
            return -value if sign else value
        if tag == FLOAT_EXT:
            start = self._need(31, "float")
            text = bytes(self.data[start:start + 31]).split(b"\x00", 1)[0]
            try:
                number = float(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise DecodeError(f"FLOAT_EXT text {text!r} is not a number", start) from None
            return _finite(number, at)
        if tag == COMPRESSED:
            raise DecodeError("a compressed term may only appear at the top level", at)
        if tag in _REFUSED:
            raise DecodeError(f"unsupported term type {_REFUSED[tag]} (tag {tag})", at)
        raise DecodeError(f"unknown tag {tag}", at)

    def _atom(self, tag: int) -> Any:
        small = tag in (SMALL_ATOM_UTF8_EXT, SMALL_ATOM_EXT)
        n = self._u8("atom length") if small else self._u16("atom length")
        start = self._need(n, "atom")
        raw = bytes(self.data[start:start + n])
        try:
            name = raw.decode("utf-8" if tag in (SMALL_ATOM_UTF8_EXT, ATOM_UTF8_EXT) else "latin-1")
        except UnicodeDecodeError:
            raise DecodeError(f"atom {raw[:40]!r} is not valid UTF-8", start) from None
        if len(name) > MAX_ATOM_CHARS:
            raise DecodeError(f"atom of {len(name)} characters exceeds Erlang's {MAX_ATOM_CHARS}", start)
        atom: Any = True if name == "true" else False if name == "false" else None if name == "nil" else Atom(name)
        if tag == SMALL_ATOM_UTF8_EXT and len(_ATOMS) < _ATOM_CACHE_MAX:
            _ATOMS[raw] = atom
        return atom

    def _map(self, depth: int) -> dict[Any, Any]:
        n = self._count("map", True, 2)
        out: dict[Any, Any] = {}
        for _ in range(n):
            key_at = self.pos
            key = self.term(depth + 1)
            value = self.term(depth + 1)
            try:
                if key in out:
                    raise DecodeError(f"duplicate map key {key!r}", key_at)
                out[key] = value
            except TypeError:
                raise DecodeError(
                    f"map key of type {type(key).__name__} is not supported (keys must be atoms, "
                    "numbers, binaries or tuples of them)", key_at) from None
        return out


_ATOMS: dict[bytes, Any] = {}
_MISS = object()


def _finite(value: float, at: int) -> float:
    if not math.isfinite(value):
        raise DecodeError(f"float {value!r} has no Erlang form (Erlang floats are finite)", at)
    return value
