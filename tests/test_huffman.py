"""Canonical Huffman coding of byte streams: round trips, the prefix property, optimality."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eiec.errors import FormatError
from eiec import huffman


@st.composite
def skewed_streams(draw) -> np.ndarray:
    """Byte streams as EIE's code/rel streams look: a few frequent symbols, a long tail."""
    n = draw(st.integers(0, 3000))
    p = draw(st.sampled_from([0.05, 0.3, 0.7, 0.95]))
    top = draw(st.sampled_from([1, 2, 15, 255]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return np.minimum(rng.geometric(p, n) - 1, top).astype(np.uint8)


def slow_huffman_cost(counts: np.ndarray) -> int:
    """Total bits of an optimal prefix code: the sum of all merged weights (one bit per symbol if alone)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def code_strings(lengths: np.ndarray) -> dict[int, str]:
    codes = huffman.canonical_codes(lengths)
    return {s: format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths)}


@settings(max_examples=80, deadline=None)
@given(skewed_streams())
def test_round_trip_restores_the_stream(symbols):
    stream = huffman.encode(symbols)
    np.testing.assert_array_equal(huffman.decode(stream), symbols)
    again = huffman.HuffmanStream.from_bytes(stream.to_bytes())
    np.testing.assert_array_equal(huffman.decode(again), symbols)
    assert stream.nbytes == len(stream.to_bytes())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=400))
def test_round_trip_of_arbitrary_bytes(values):
    symbols = np.array(values, np.uint8)
    np.testing.assert_array_equal(huffman.decode(huffman.encode(symbols)), symbols)


@settings(max_examples=60, deadline=None)
@given(skewed_streams())
def test_encoded_size_is_sum_of_count_times_length_and_optimal(symbols):
    counts = np.bincount(symbols, minlength=256)
    stream = huffman.encode(symbols)
    assert stream.n_bits == int((counts * stream.lengths.astype(np.int64)).sum())
    assert len(stream.payload) == -(-stream.n_bits // 8)
    if symbols.size:
        assert stream.n_bits == slow_huffman_cost(counts)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=256))
def test_canonical_code_is_prefix_free_and_satisfies_kraft(counts):
    lengths = huffman.code_lengths(np.array(counts))
    assert ((lengths > 0) == (np.array(counts) > 0)).all()
    assert np.sum(2.0 ** -lengths[lengths > 0].astype(float)) <= 1.0
    words = sorted(code_strings(lengths).values())
    # in sorted order a prefix would sit right before a word it starts
    assert not any(b.startswith(a) for a, b in zip(words, words[1:]))


def test_single_symbol_stream_gets_one_bit_codes():
    symbols = np.full(13, 7, np.uint8)
    stream = huffman.encode(symbols)
    assert stream.lengths[7] == 1 and np.count_nonzero(stream.lengths) == 1
    assert stream.n_bits == 13
    np.testing.assert_array_equal(huffman.decode(stream), symbols)


def test_empty_stream_round_trips():
    stream = huffman.encode(np.zeros(0, np.uint8))
    assert stream.n_bits == 0 and stream.payload == b""
    assert huffman.decode(huffman.HuffmanStream.from_bytes(stream.to_bytes())).size == 0


def test_lengths_are_limited_and_the_limited_code_still_round_trips():
    fib = [1, 1]
    while len(fib) < 20:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    assert huffman._heap_lengths(counts).max() == 19  # unconstrained: Fibonacci depth
    assert huffman.code_lengths(counts).max() <= huffman.MAX_CODE_LEN
    lengths = huffman.code_lengths(counts, max_len=8)
    assert lengths.max() <= 8 and (lengths > 0).all()
    assert np.sum(2.0 ** -lengths.astype(float)) <= 1.0
    symbols = np.repeat(np.arange(20, dtype=np.uint8), counts)
    stream = huffman.encode(symbols, max_len=8)
    np.testing.assert_array_equal(huffman.decode(stream), symbols)


def test_truncated_or_inconsistent_streams_raise_format_error():
    stream = huffman.encode(np.array([1, 2, 2, 3, 3, 3, 3], np.uint8))
    data = stream.to_bytes()
    with pytest.raises(FormatError):
        huffman.HuffmanStream.from_bytes(data[:-1])
    with pytest.raises(FormatError):
        huffman.HuffmanStream.from_bytes(data[:5])
    too_many = huffman.HuffmanStream(stream.lengths, stream.payload, stream.n_symbols + 1, stream.n_bits,
                                     stream.chunk_bits)
    with pytest.raises(FormatError):
        huffman.decode(too_many)
    too_few = huffman.HuffmanStream(stream.lengths, stream.payload, stream.n_symbols - 1, stream.n_bits,
                                    stream.chunk_bits)
    with pytest.raises(FormatError):
        huffman.decode(too_few)


def test_streams_of_many_chunks_decode_together_and_each_chunk_must_end_where_the_next_starts():
    """Several streams (one decoded batch) over many SYNC_SYMBOLS chunks, against the symbols;
    then a chunk length off by one bit, which no amount of decoding can hide."""
    rng = np.random.default_rng(1)
    symbols = [np.minimum(rng.geometric(p, n) - 1, 15).astype(np.uint8)
               for p, n in ((0.3, 5 * huffman.SYNC_SYMBOLS + 17), (0.9, 3), (0.05, 2 * huffman.SYNC_SYMBOLS))]
    streams = [huffman.encode(s) for s in symbols]
    assert streams[0].chunk_bits.size == 5 and streams[2].chunk_bits.size == 1
    for got, want in zip(huffman.decode_many(streams + [huffman.encode(np.zeros(0, np.uint8))]), symbols + [[]]):
        np.testing.assert_array_equal(got, want)
    bad = streams[0].chunk_bits.copy()
    bad[2] += 1
    with pytest.raises(FormatError, match="damaged"):
        huffman.decode(huffman.HuffmanStream(streams[0].lengths, streams[0].payload, streams[0].n_symbols,
                                             streams[0].n_bits, bad))


def test_a_code_table_that_is_not_a_prefix_code_is_refused_before_decoding():
    stream = huffman.encode(np.array([1, 2, 2, 3, 3, 3, 3], np.uint8))
    lengths = stream.lengths.copy()
    lengths[[4, 5, 6]] = 1  # three more 1-bit codes: Kraft sum > 1
    with pytest.raises(FormatError, match="not a prefix code"):
        huffman.decode(huffman.HuffmanStream(lengths, stream.payload, stream.n_symbols, stream.n_bits,
                                             stream.chunk_bits))


def test_flipped_payload_bits_are_refused_or_change_the_symbols_never_crash():
    """Any single flipped bit of a stream whose code is incomplete either decodes (to other
    symbols: the .eie's image digest then refuses it) or is a FormatError."""
    rng = np.random.default_rng(2)
    symbols = np.minimum(rng.geometric(0.4, 3 * huffman.SYNC_SYMBOLS) - 1, 9).astype(np.uint8)
    stream = huffman.encode(symbols)
    payload = np.frombuffer(stream.payload, np.uint8)
    for bit in rng.integers(0, stream.n_bits, 40):
        flipped = payload.copy()
        flipped[bit // 8] ^= np.uint8(0x80 >> (bit % 8))
        try:
            got = huffman.decode(huffman.HuffmanStream(stream.lengths, flipped.tobytes(), stream.n_symbols,
                                                       stream.n_bits, stream.chunk_bits))
        except FormatError:
            continue
        assert got.shape == symbols.shape and not np.array_equal(got, symbols)
