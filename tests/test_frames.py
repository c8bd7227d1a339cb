"""Frame-range and chunk arithmetic, checked as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farm.frames import FrameRangeError, chunk_frames, count_frames, format_frames, parse_frames

frame_sets = st.lists(st.integers(min_value=-50, max_value=5000), min_size=1, max_size=200, unique=True)


@given(frame_sets)
def test_format_then_parse_gives_the_same_frames(frames):
    assert parse_frames(format_frames(frames)) == sorted(frames)


@given(st.integers(-1000, 1000), st.integers(0, 500), st.integers(1, 20))
def test_stepped_range_matches_python_range(start, length, step):
    end = start + length
    assert parse_frames(f"{start}-{end}x{step}") == list(range(start, end + 1, step))


@given(frame_sets)
def test_count_of_a_spec_without_overlaps_is_the_number_of_frames(frames):
    assert count_frames(format_frames(frames)) == len(frames)


@given(st.integers(-10**12, 10**12), st.integers(0, 10**15), st.integers(1, 10**6))
def test_count_of_a_huge_range_is_arithmetic(start, length, step):
    # no list is built: a billion billion frames are counted at once
    assert count_frames(f"{start}-{start + length}x{step}") == len(range(start, start + length + 1, step))


def test_count_counts_an_overlap_twice_and_a_frame_number_too_long_is_refused():
    assert count_frames("1-10,5-10") == 16
    with pytest.raises(FrameRangeError, match="too many digits"):
        count_frames("1-" + "9" * 5000)


@given(frame_sets, st.integers(1, 50))
def test_chunks_cover_every_frame_once_in_order(frames, size):
    ordered = sorted(frames)
    chunks = chunk_frames(ordered, size)
    assert [f for chunk in chunks for f in chunk] == ordered
    assert all(1 <= len(chunk) <= size for chunk in chunks)
    assert all(len(chunk) == size for chunk in chunks[:-1])
    assert len(chunks) == -(-len(ordered) // size)


@given(st.integers(-100, 100), st.integers(1, 100))
def test_end_before_start_is_refused(start, gap):
    with pytest.raises(FrameRangeError, match=f"end {start - gap} is before start {start}"):
        parse_frames(f"{start}-{start - gap}")


@given(st.integers(-10, 0))
def test_chunk_size_must_be_positive(size):
    with pytest.raises(FrameRangeError, match="at least 1 frame"):
        chunk_frames([1, 2, 3], size)


@pytest.mark.parametrize("spec, frames", [
    ("1-5", [1, 2, 3, 4, 5]),
    ("1-10x3", [1, 4, 7, 10]),
    ("1,5,10-12", [1, 5, 10, 11, 12]),
    ("3,1,2,2", [1, 2, 3]),
    (7, [7]),
])
def test_examples_from_the_docs(spec, frames):
    assert parse_frames(spec) == frames


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("a-b", "cannot read 'a-b'"), ("1-10x0", "step 0"), ("1--", "cannot read"), ("1-5,", "cannot read ''"),
])
def test_malformed_specs_say_what_is_wrong(spec, message):
    with pytest.raises(FrameRangeError, match=message):
        parse_frames(spec)
