"""Several renders on one Renderer at once (a service's case), on the shared local cluster:
a short render started during a long one finishes first, every render's frames are those of
the same render run alone, a cancelled render resumes, and the progress hook counts up."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import demo_inputs, psnr_db

from lipsync_ray.avatar import Avatar, pingpong_indices
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.errors import Cancelled, InputError
from lipsync_ray.pipeline import Renderer
from lipsync_ray.shards import ShardCodec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LONG_S, SHORT_S = 10.0, 1.0  # audio: ~250 and ~25 output frames
CHUNK = 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("concurrent-inputs")
    inputs = demo_inputs(
        root, avatar_seconds=1.0, size_wh=(160, 128), avatar_seed=1, audio_seconds=SHORT_S,
        audio_seed=3,
    )  # fmt: skip
    long = write_audio(root / "long.wav", synth_speech(LONG_S, seed=7))
    return {"avatar": inputs["avatar"], "short": inputs["audio"], "long": long}


@pytest.fixture(scope="module")
def renderer(ray_cluster, small_models, inputs):
    config = RenderConfig(
        model=str(small_models["identity"]),
        audio_encoder=str(small_models["encoder"]),
        # 4 chunks in flight: 2 each while two renders run
        pool=PoolConfig(
            chunk_frames=CHUNK,
            gpus_per_actor=0.0,
            inference_actors=1,
            compositors=1,
            max_chunks_in_flight=4,
        ),
        shard_codec=ShardCodec.RAW,
        keep_shards=True,
    )
    with Renderer(inputs["avatar"], config) as renderer:
        yield renderer


class _Frames:
    """An ``on_frames`` hook that records its calls and the thread they came from."""

    def __init__(self, started: threading.Event | None = None, fair=None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.threads: set[int] = set()
        self.started = started
        self.fair = fair  # the renderer's FairShare: (renders, chunks in flight) at each call
        self.shared: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        self.threads.add(threading.get_ident())
        if self.fair is not None:
            self.shared.append((self.fair.active, self.fair.in_flight))
        if self.started is not None and done > 0:
            self.started.set()

    def check(self, total: int, *, resumed: bool = False) -> None:
        """Called at plan time (0 done, or the reused frames when ``resumed``), then after
        every chunk with more done, up to ``total``."""
        done = [d for d, _ in self.calls]
        assert {t for _, t in self.calls} == {total}
        assert (done[0] > 0) if resumed else (done[0] == 0), done
        assert all(a < b for a, b in itertools.pairwise(done)), done
        assert done[-1] == total
        assert len(done) - 1 >= -(-(total - done[0]) // CHUNK)  # one call per chunk at least


def _render(renderer, audio, root: Path, name: str, **hooks):
    return renderer.render(audio, root / f"{name}.mp4", work_dir=root / f"{name}-work", **hooks)


def _images(report) -> list[bytes]:
    files = sorted((Path(report.work_dir) / "shards").glob("chunk-*.parquet"))
    return [cell for f in files for cell in pq.read_table(f).column("image").to_pylist()]


def _decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def alone(renderer, inputs, tmp_path_factory) -> dict:
    """Each render run alone on the renderer: the references."""
    root = tmp_path_factory.mktemp("alone")
    return {
        name: _render(renderer, inputs[name], root, name, on_frames=frames)
        for name, frames in (("long", _Frames()), ("short", _Frames()))
    }


def test_a_render_alone_reproduces_the_avatar(alone, inputs):
    """The reference itself, against the avatar frames (the identity model)."""
    report = alone["long"]
    avatar = Avatar.open(inputs["avatar"])
    frames = _decode(report.output)
    expected = avatar.read_frames(pingpong_indices(report.frames, avatar.frame_count))
    assert len(frames) == report.frames > 200
    assert min(psnr_db(f, e) for f, e in zip(frames, expected, strict=True)) > 30.0


def test_a_short_render_overtakes_a_long_one(renderer, inputs, alone, tmp_path):
    began, long_done = threading.Event(), threading.Event()
    fair = renderer._shares.peek()  # made by the first render (the references)
    long_frames, short_frames = _Frames(began), _Frames(fair=fair)
    result: dict = {}

    def long_render():
        try:
            result["long"] = _render(renderer, inputs["long"], tmp_path, "long",
                                     on_frames=long_frames)  # fmt: skip
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc
        finally:
            long_done.set()

    thread = threading.Thread(target=long_render)
    thread.start()
    try:
        assert began.wait(120), "the long render finished no chunk"
        with pytest.raises(InputError, match="another render"):  # its work directory is busy
            renderer.render(inputs["short"], tmp_path / "x.mp4", work_dir=tmp_path / "long-work")
        short = _render(renderer, inputs["short"], tmp_path, "short", on_frames=short_frames)
        long_running_then = not long_done.is_set()
    finally:
        thread.join(300)
    assert "error" not in result, result.get("error")
    assert long_running_then, "the long render finished before the short one"
    long = result["long"]

    for report, ref in ((long, alone["long"]), (short, alone["short"])):
        assert report.frames == ref.frames and report.chunks_rendered == ref.chunks
        assert _images(report) == _images(ref)  # lossless shards: byte for byte
        got, want = _decode(report.output), _decode(ref.output)
        assert len(got) == len(want) == report.frames
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    # The two renders ran on one FairShare, within the pools' limit (4) together but for the
    # short render's first chunk, which never waits for room.
    assert max(active for active, _ in short_frames.shared) == 2
    assert max(n for _, n in short_frames.shared) <= fair.limit + 1 == 5
    assert fair.active == 0 and fair.in_flight == 0  # every share given back
    long_frames.check(long.frames)
    short_frames.check(short.frames)
    assert long_frames.threads == {thread.ident}
    assert short_frames.threads == {threading.get_ident()}


def test_a_cancelled_render_raises_and_resumes(renderer, inputs, alone, tmp_path):
    cancel = threading.Event()
    seen = []

    def cancel_after_a_chunk(done: int, total: int) -> None:
        seen.append((done, total))
        if done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        _render(renderer, inputs["short"], tmp_path, "again", on_frames=cancel_after_a_chunk,
                cancel=cancel)  # fmt: skip
    assert not (tmp_path / "again.mp4").exists()
    assert seen[0][0] == 0 and seen[-1][0] > 0  # cancelled once a chunk was recorded

    frames = _Frames()
    resumed = _render(renderer, inputs["short"], tmp_path, "again", on_frames=frames)
    ref = alone["short"]
    assert resumed.chunks_reused > 0
    assert resumed.chunks_reused + resumed.chunks_rendered == ref.chunks
    frames.check(resumed.frames, resumed=True)
    assert _images(resumed) == _images(ref)
    got, want = _decode(resumed.output), _decode(ref.output)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert len(got) == len(want)
