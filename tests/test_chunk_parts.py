"""A chunk's inference split into parts at a render's end (``ChunkSpec.part``) and the parts'
predictions joined again (``joined_predictions``): each part carries exactly its frames'
inputs, and the joined predictions are the whole chunk's, in frame order."""

from __future__ import annotations

import numpy as np
import pytest

from lipsync_ray.chunks import ChunkRange, ChunkSpec, Predictions, joined_predictions
from lipsync_ray.contract import AUDIO_CONTEXT
from lipsync_ray.scheduler import padded_rows


def _spec(weights: bool = False) -> ChunkSpec:
    features = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    start, stop = 40, 60
    return ChunkSpec(
        3, start, stop, np.arange(start, stop) % 7,
        padded_rows(features, ChunkRange(3, start, stop)),
        np.linspace(0, 1, stop - start, dtype=np.float32) if weights else None, priority=9,
    )  # fmt: skip


@pytest.mark.parametrize(("lo", "hi"), [(0, 20), (0, 8), (8, 20), (5, 6)])
@pytest.mark.parametrize("weights", [False, True])
def test_a_part_carries_its_frames_inputs(lo, hi, weights):
    whole = _spec(weights)
    part = whole.part(lo, hi)
    assert (part.chunk, part.start, part.stop, part.priority) == (3, 40 + lo, 40 + hi, 9)
    assert np.array_equal(part.avatar_indices, whole.avatar_indices[lo:hi])
    # the audio windows of the part's frames are those of the same frames in the whole
    for k in range(part.frames):
        window = part.feature_rows[k : k + 2 * AUDIO_CONTEXT]
        assert np.array_equal(window, whole.feature_rows[lo + k : lo + k + 2 * AUDIO_CONTEXT])
    assert part.feature_rows.shape == (hi - lo + 2 * AUDIO_CONTEXT, 4)
    if weights:
        assert np.array_equal(part.weights, whole.weights[lo:hi])
    else:
        assert part.weights is None


@pytest.mark.parametrize(("lo", "hi"), [(-1, 5), (5, 5), (6, 5), (0, 21)])
def test_a_part_outside_the_chunk_is_refused(lo, hi):
    with pytest.raises(ValueError, match=rf"part \[{lo}, {hi}\) of a chunk of 20 frames"):
        _spec().part(lo, hi)


def _predictions(chunk: int, first: int, frames: int, actor: str) -> Predictions:
    images = np.arange(first, first + frames, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 2, 2, 3), np.uint8
    )
    return Predictions(chunk, images, {"inference": 1.0 * frames}, {"inference": 0.5}, actor)


def test_the_parts_predictions_join_in_frame_order_with_their_stage_times_summed():
    parts = (_predictions(3, 0, 12, "a"), _predictions(3, 12, 8, "b"))
    joined = joined_predictions(parts)
    assert joined.chunk == 3 and joined.images.shape == (20, 2, 2, 3)
    assert [int(im[0, 0, 0]) for im in joined.images] == list(range(20))
    assert joined.timings_s == {"inference": 20.0} and joined.cpu_s == {"inference": 1.0}
    assert joined.actor == "a+b"
    assert joined_predictions(parts[:1]) is parts[0]  # a whole chunk: as it is


def test_parts_of_different_chunks_are_refused():
    with pytest.raises(ValueError, match=r"parts of chunks \[3, 4\], expected one chunk"):
        joined_predictions((_predictions(3, 0, 4, "a"), _predictions(4, 4, 4, "b")))
