"""The .eie container and the tensor archives inside it: round trips, determinism,
and that every damaged or tampered file is refused with a FormatError."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from eiec import container, tensorfile
from eiec.container import FORMAT_VERSION, read_eie, resign, write_eie
from eiec.errors import FormatError
from eiec.tensorfile import pack_arrays, unpack_arrays

# ---------------------------------------------------------------- tensor archives

dtypes = st.sampled_from(sorted(tensorfile.DTYPES)).map(np.dtype)
arrays = dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
)
archives = st.dictionaries(st.text(min_size=0, max_size=8), arrays, max_size=5)


def same_array(x: np.ndarray, y: np.ndarray) -> bool:
    """Bitwise equality, so NaN payloads and -0.0 count too."""
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def sample_archive() -> bytes:
    return pack_arrays(
        {
            "code": np.arange(13, dtype=np.uint8),
            "col_ptr": np.arange(12, dtype=np.int64).reshape(3, 4),
            "codebook": np.linspace(-1, 1, 16, dtype=np.float32),
            "empty": np.zeros((0, 3), np.int16),
            "scalar": np.float64(2.5),
        }
    )


def craft_archive(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    out = tensorfile.PREFIX.pack(tensorfile.MAGIC, tensorfile.VERSION, len(text)) + text
    return out + bytes(tensorfile.align(len(out)) - len(out)) + data


@settings(max_examples=150, deadline=None)
@given(archives)
def test_pack_unpack_round_trip(arrs):
    back = unpack_arrays(pack_arrays(arrs), "a")
    assert sorted(back) == sorted(arrs)
    for name, arr in arrs.items():
        assert same_array(back[name], arr.astype(arr.dtype.newbyteorder("<")))
        assert not back[name].flags.writeable


@settings(max_examples=50, deadline=None)
@given(archives)
def test_pack_is_deterministic_and_order_free(arrs):
    reordered = dict(reversed(list(arrs.items())))
    assert pack_arrays(arrs) == pack_arrays(reordered) == pack_arrays(dict(arrs))


def test_layout_and_byte_order_do_not_change_the_bytes():
    x = np.arange(24, dtype=np.int32).reshape(4, 6)
    assert pack_arrays({"x": x.T}) == pack_arrays({"x": np.ascontiguousarray(x.T)})
    assert pack_arrays({"x": x.astype(">i4")}) == pack_arrays({"x": x})
    # the stored bytes are the little-endian C-order values
    data = pack_arrays({"x": x})
    assert data.endswith(x.astype("<i4").tobytes())


@pytest.mark.parametrize("bad", [np.zeros(3, bool), np.zeros(3, np.float16), np.array([None]), np.zeros(2, np.complex64)])
def test_pack_rejects_dtypes_outside_the_whitelist(bad):
    with pytest.raises(TypeError, match="not storable"):
        pack_arrays({"x": bad})


def test_arrays_are_read_only_views_of_immutable_input_and_copies_otherwise():
    data = sample_archive()
    assert np.shares_memory(unpack_arrays(data, "a")["col_ptr"], np.frombuffer(data, np.uint8))
    mutable = bytearray(data)
    arr = unpack_arrays(mutable, "a")["col_ptr"]
    mutable[-1] ^= 0xFF
    assert not arr.flags.writeable and arr[-1, -1] == 11


def test_every_truncation_of_an_archive_is_rejected():
    data = sample_archive()
    for cut in range(len(data)):
        with pytest.raises(FormatError):
            unpack_arrays(data[:cut], "a")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_unpack_raises_only_format_error_on_byte_flips(data):
    good = bytearray(sample_archive())
    for _ in range(data.draw(st.integers(1, 4))):
        good[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    try:
        unpack_arrays(bytes(good), "a")
    except FormatError as exc:
        assert exc.path == "a" and "\n" not in exc.reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_unpack_raises_only_format_error_on_random_bytes(junk, with_prefix):
    data = tensorfile.PREFIX.pack(tensorfile.MAGIC, tensorfile.VERSION, len(junk)) + junk if with_prefix else junk
    try:
        unpack_arrays(data, "a")
    except FormatError:
        pass


def entry(dtype="uint8", shape=(4,), offset=0, nbytes=4):
    return {"dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


@pytest.mark.parametrize(
    "header, data, reason",
    [
        ({"x": entry(dtype="object")}, bytes(8), "dtype 'object' is not allowed"),
        ({"x": entry(shape=(-4,))}, bytes(8), "shape must be"),
        ({"x": entry(shape=(4.0,))}, bytes(8), "shape must be"),
        ({"x": entry(shape=(1,) * 40, nbytes=1)}, bytes(8), "shape must be"),
        ({"x": entry(shape=(0, 1 << 30, 1 << 30), nbytes=0)}, b"", "element limit"),
        ({"x": entry(shape=(3,))}, bytes(8), "is not 4 bytes"),
        ({"x": entry(offset=8)}, bytes(8), "run past the end"),
        ({"x": entry(offset=3)}, bytes(8), "not 8-byte aligned"),
        ({"x": entry(), "y": entry()}, bytes(8), "overlaps"),
        ({"x": entry(), "y": {**entry(), "extra": 1}}, bytes(8), "exactly"),
        ({"x": entry()}, bytes(16), "trailing bytes"),
        ({"x": entry()}, bytes(4) + b"\x01" + bytes(3) + bytes(4), "trailing bytes"),
        ({"x": entry(offset=8)}, b"\x01" + bytes(11), "nonzero padding"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_unpack_rejects_inconsistent_headers(header, data, reason):
    with pytest.raises(FormatError, match=reason):
        unpack_arrays(craft_archive(header, data), "a")


def test_unpack_rejects_duplicate_keys_and_bad_magic():
    text = b'{"x":' + json.dumps(entry()).encode() + b',"x":' + json.dumps(entry()).encode() + b"}"
    data = tensorfile.PREFIX.pack(tensorfile.MAGIC, tensorfile.VERSION, len(text)) + text
    data += bytes(tensorfile.align(len(data)) - len(data)) + bytes(4)
    with pytest.raises(FormatError, match="duplicate key"):
        unpack_arrays(data, "a")
    with pytest.raises(FormatError, match="bad magic"):
        unpack_arrays(b"PK\x03\x04" + sample_archive()[4:], "a")


# ---------------------------------------------------------------- .eie container

MANIFEST = {"target": {"pes": 4, "clock_mhz": 800.0}, "layers": [{"name": "fc1", "density": 0.25}], "note": "é"}
MEMBERS = {"seg0/program": b"\x07" + bytes(23), "seg0/tile0": sample_archive(), "empty": b"", "odd": b"abc"}


@pytest.fixture
def eie(tmp_path):
    path = tmp_path / "m.eie"
    write_eie(path, MANIFEST, MEMBERS)
    return path


def payload_start(data: bytes) -> int:
    manifest_len = struct.unpack_from("<Q", data, 8)[0]
    return tensorfile.align(container.HEADER.size + manifest_len)


def craft_eie(path, manifest: dict, payload: bytes, version: int = FORMAT_VERSION) -> None:
    """A correctly signed file with an arbitrary manifest (write_eie would refuse it); from
    version 2 on the manifest is deflated."""
    text = json.dumps(manifest).encode()
    if version >= 2:
        text = zlib.compress(text)
    head = container.HEADER.pack(b"EIE\0", version, 0, len(text), hashlib.sha256(text).digest()) + text
    path.write_bytes(head + bytes(tensorfile.align(len(head)) - len(head)) + payload)


def test_write_read_round_trip(eie):
    got = read_eie(eie)
    assert got.members == MEMBERS
    assert got.manifest["format_version"] == FORMAT_VERSION
    assert got.manifest["eiec_version"] == __import__("eiec").__version__
    assert {k: v for k, v in got.manifest.items() if k not in container.RESERVED_KEYS} == MANIFEST
    assert [m["name"] for m in got.manifest["members"]] == sorted(MEMBERS)
    assert got.path == os.fspath(eie)
    assert same_array(got.arrays("seg0/tile0")["col_ptr"], np.arange(12, dtype=np.int64).reshape(3, 4))


def test_layout_matches_the_documented_header(eie):
    data = eie.read_bytes()
    magic, version, reserved, manifest_len, digest = struct.unpack_from("<4sHHQ32s", data)
    text = data[48 : 48 + manifest_len]
    assert (magic, version, reserved) == (b"EIE\0", 2, 0)
    assert hashlib.sha256(text).digest() == digest
    manifest = json.loads(zlib.decompress(text))
    assert list(manifest) == sorted(manifest)  # sorted keys
    start = payload_start(data)
    codecs = set()
    for m in manifest["members"]:
        assert m["offset"] % 8 == 0
        blob = data[start + m["offset"] : start + m["offset"] + m["size"]]
        assert hashlib.sha256(blob).hexdigest() == m["sha256"]
        raw = zlib.decompress(blob) if m["codec"] == "deflate" else blob
        assert raw == MEMBERS[m["name"]] and len(raw) == m["raw_size"]
        codecs.add(m["codec"])
    assert codecs == {"raw", "deflate"}  # the archive deflates; three bytes do not


def test_members_named_raw_are_never_deflated(tmp_path):
    write_eie(tmp_path / "r.eie", MANIFEST, MEMBERS, raw={"seg0/tile0"})
    table = {m["name"]: m for m in read_eie(tmp_path / "r.eie").manifest["members"]}
    assert table["seg0/tile0"]["codec"] == "raw" and table["seg0/tile0"]["size"] == len(MEMBERS["seg0/tile0"])
    assert read_eie(tmp_path / "r.eie").members == MEMBERS


def test_two_writes_are_byte_identical(tmp_path):
    write_eie(tmp_path / "a.eie", MANIFEST, MEMBERS)
    write_eie(tmp_path / "b.eie", dict(reversed(MANIFEST.items())), dict(reversed(MEMBERS.items())))
    assert (tmp_path / "a.eie").read_bytes() == (tmp_path / "b.eie").read_bytes()


def test_numpy_values_in_the_manifest_are_written_as_json(tmp_path):
    path = tmp_path / "n.eie"
    write_eie(path, {"shape": np.array([3, 4]), "bits": np.int64(4), "ok": np.bool_(True)}, {})
    assert read_eie(path).manifest["shape"] == [3, 4]
    with pytest.raises(ValueError, match="set by write_eie"):
        write_eie(path, {"members": []}, {})
    with pytest.raises(ValueError):
        write_eie(path, {"x": float("nan")}, {})


def test_a_tampered_member_byte_is_a_checksum_mismatch(eie):
    data = bytearray(eie.read_bytes())
    manifest_len = struct.unpack_from("<Q", data, 8)[0]
    odd = next(m for m in json.loads(zlib.decompress(data[48 : 48 + manifest_len]))["members"] if m["name"] == "odd")
    data[payload_start(data) + odd["offset"] + 1] ^= 0x01
    eie.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="member odd: checksum mismatch") as info:
        read_eie(eie)
    assert info.value.path == os.fspath(eie)


def test_every_single_bit_flip_is_detected(eie):
    good = eie.read_bytes()
    for pos in range(len(good)):
        bad = bytearray(good)
        bad[pos] ^= 1 << (pos % 8)
        eie.write_bytes(bytes(bad))
        with pytest.raises(FormatError):
            read_eie(eie)


def test_every_truncation_is_rejected(eie):
    good = eie.read_bytes()
    for cut in range(len(good)):
        eie.write_bytes(good[:cut])
        with pytest.raises(FormatError):
            read_eie(eie)
    eie.write_bytes(good + b"\0")
    with pytest.raises(FormatError, match="trailing bytes"):
        read_eie(eie)


def test_a_newer_format_version_is_refused_by_name(eie):
    data = bytearray(eie.read_bytes())
    data[4:6] = struct.pack("<H", FORMAT_VERSION + 1)
    eie.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=rf"format version {FORMAT_VERSION + 1} is newer than this eiec "
                                          rf"supports \({FORMAT_VERSION}\)"):
        read_eie(eie)


def test_other_files_are_not_eie_files(tmp_path):
    onnx_like = tmp_path / "model.onnx"
    onnx_like.write_bytes(b"\x08\x07\x12\x04eiec" + bytes(100))
    with pytest.raises(FormatError, match="not an .eie file"):
        read_eie(onnx_like)
    with pytest.raises(FormatError, match="cannot read"):
        read_eie(tmp_path / "missing.eie")


GOOD_MEMBER = {"name": "x", "offset": 0, "size": 4, "sha256": hashlib.sha256(b"abcd").hexdigest(), "codec": "raw",
               "raw_size": 4}
V = FORMAT_VERSION
BOMB = zlib.compress(bytes(1 << 20), 9)  # 1 MiB of zeros in about a kilobyte


@pytest.mark.parametrize(
    "manifest, payload, reason",
    [
        ({"eiec_version": "0", "members": []}, b"", "format_version None differs"),
        ({"format_version": V, "members": []}, b"", "no eiec_version"),
        ({"format_version": V, "eiec_version": "0"}, b"", "no members list"),
        ({"format_version": V, "eiec_version": "0", "members": [GOOD_MEMBER, GOOD_MEMBER]}, b"abcd", "listed twice"),
        ({"format_version": V, "eiec_version": "0", "members": [{**GOOD_MEMBER, "size": -1}]}, b"abcd", "non-negative"),
        ({"format_version": V, "eiec_version": "0", "members": [{**GOOD_MEMBER, "offset": 4}]}, b"abcd", "aligned"),
        ({"format_version": V, "eiec_version": "0", "members": [{**GOOD_MEMBER, "size": 9, "raw_size": 9}]}, b"abcd",
         "past the end"),
        ({"format_version": V, "eiec_version": "0", "members": [{**GOOD_MEMBER, "sha256": "AB"}]}, b"abcd", "hex"),
        ({"format_version": V, "eiec_version": "0", "members": [{**GOOD_MEMBER, "path": "/etc"}]}, b"abcd", "exactly"),
        (
            {"format_version": V, "eiec_version": "0", "members": [GOOD_MEMBER, {**GOOD_MEMBER, "name": "y"}]},
            b"abcd",
            "overlaps",
        ),
        ({"format_version": V, "eiec_version": "0", "members": [{**GOOD_MEMBER, "codec": "gzip"}]}, b"abcd", "codec"),
        ({"format_version": V, "eiec_version": "0", "members": [{**GOOD_MEMBER, "raw_size": 5}]}, b"abcd", "codec"),
        ({"format_version": V, "eiec_version": "0", "members": [{**GOOD_MEMBER, "codec": "deflate"}]}, b"abcd",
         "damaged deflate"),
        ({"format_version": V, "eiec_version": "0", "members": [{
            **GOOD_MEMBER, "codec": "deflate", "size": len(BOMB), "raw_size": 1 << 40,
            "sha256": hashlib.sha256(BOMB).hexdigest()}]}, BOMB, "cannot inflate"),
        ({"format_version": V, "eiec_version": "0", "members": [{
            **GOOD_MEMBER, "codec": "deflate", "size": len(BOMB), "raw_size": 1000,
            "sha256": hashlib.sha256(BOMB).hexdigest()}]}, BOMB, "inflates to over 1000 bytes"),
    ],
)
def test_signed_but_inconsistent_member_tables_are_refused(tmp_path, manifest, payload, reason):
    path = tmp_path / "c.eie"
    craft_eie(path, manifest, payload)
    with pytest.raises(FormatError, match=reason):
        read_eie(path)


def test_a_manifest_that_inflates_past_its_limit_is_refused_unread(tmp_path):
    path = tmp_path / "c.eie"
    text = zlib.compress(b" " * (container.MAX_MANIFEST_BYTES + 10), 9)
    head = container.HEADER.pack(b"EIE\0", V, 0, len(text), hashlib.sha256(text).digest()) + text
    path.write_bytes(head + bytes(tensorfile.align(len(head)) - len(head)))
    with pytest.raises(FormatError, match="manifest: inflates to over"):
        read_eie(path)


def test_crafted_file_with_a_consistent_table_reads(tmp_path):
    path = tmp_path / "c.eie"
    craft_eie(path, {"format_version": V, "eiec_version": "0", "members": [GOOD_MEMBER]}, b"abcd")
    assert read_eie(path).members == {"x": b"abcd"}
    packed = zlib.compress(b"abcd" * 100)
    member = {**GOOD_MEMBER, "codec": "deflate", "size": len(packed), "raw_size": 400,
              "sha256": hashlib.sha256(packed).hexdigest()}
    craft_eie(path, {"format_version": V, "eiec_version": "0", "members": [member]}, packed)
    assert read_eie(path).members == {"x": b"abcd" * 100}


def test_a_version_1_file_reads(tmp_path):
    """Format version 1: a plain JSON manifest and members without codec or raw_size."""
    path = tmp_path / "v1.eie"
    member = {k: v for k, v in GOOD_MEMBER.items() if k not in ("codec", "raw_size")}
    craft_eie(path, {"format_version": 1, "eiec_version": "0", "members": [member]}, b"abcd", version=1)
    assert read_eie(path).members == {"x": b"abcd"}
    craft_eie(path, {"format_version": 1, "eiec_version": "0", "members": [GOOD_MEMBER]}, b"abcd", version=1)
    with pytest.raises(FormatError, match="exactly"):
        read_eie(path)


def test_resign_replaces_one_member_and_the_result_reads(eie, tmp_path):
    out = tmp_path / "r.eie"
    broken = b"EIEA" + bytes(3)  # a damaged tensor archive, correctly signed in the container
    resign(eie, out, "seg0/tile0", broken)
    got, orig = read_eie(out), read_eie(eie)
    assert got.members == {**MEMBERS, "seg0/tile0": broken}
    strip = lambda m: {k: v for k, v in m.items() if k != "members"}  # noqa: E731
    assert strip(got.manifest) == strip(orig.manifest)
    with pytest.raises(FormatError, match=r"r\.eie:seg0/tile0: "):
        got.arrays("seg0/tile0")
    with pytest.raises(KeyError):
        resign(eie, out, "nope", b"")


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failure_mid_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    calls = []

    def fail_on_second_chunk(f, chunk):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        f.write(chunk)

    monkeypatch.setattr(container, "_write_chunk", fail_on_second_chunk)
    with pytest.raises(OSError, match="No space"):
        write_eie(tmp_path / "m.eie", MANIFEST, MEMBERS)
    assert len(calls) == 2
    assert leftovers(tmp_path) == []


def test_a_failed_rewrite_keeps_the_old_file_intact(eie, tmp_path, monkeypatch):
    before = eie.read_bytes()

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(container.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        write_eie(eie, {"other": 1}, {})
    assert eie.read_bytes() == before
    assert leftovers(tmp_path) == ["m.eie"]


def test_an_interrupt_during_write_also_cleans_up(tmp_path, monkeypatch):
    def interrupt(f, chunk):
        raise KeyboardInterrupt

    monkeypatch.setattr(container, "_write_chunk", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_eie(tmp_path / "m.eie", MANIFEST, MEMBERS)
    assert leftovers(tmp_path) == []
