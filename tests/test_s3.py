"""Object storage for real: renders whose paths are ``s3://`` URIs, against an S3-protocol
server on loopback (:mod:`s3server`: moto's server mode, started and stopped here).

Every render goes through the same two-node ``ray.cluster_utils.Cluster`` (started once, after
the ``AWS_*`` environment points at the server, so the workers inherit it): the head, and a
node whose workers have their own ``TMPDIR``, hence their own staging cache, as a second
machine would. Frames are compared with a plain-path render of the same inputs.

- every path an ``s3://`` URI, through the CLI: the same frames as the local render;
- a SIGKILLed driver (a ``lipsync-ray render`` subprocess), re-run: it resumes from the work
  directory on S3;
- ``render-batch`` with a jobs file whose paths are on S3;
- ``--placement split`` over both nodes: the avatar is staged once per node;
- the server restarted mid-render: retries carry the render through, same frames;
- a bad-input table of storage failures, each one line and exit 2, before any model loads.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import cli_command
from s3server import is_probe, s3_server
from test_faults import _child_env, _kill_driver_when
from test_storage import _decode, _same_video

from lipsync_ray import storage
from lipsync_ray.cli import main
from lipsync_ray.config import Placement, PoolConfig, RenderConfig
from lipsync_ray.dev.speech import synth_speech, write_audio
from lipsync_ray.dev.synthetic import make_demo_avatar
from lipsync_ray.pipeline import render

pytestmark = pytest.mark.ray

SECONDS = 3.0  # 75 output frames: 10 chunks of 8, time enough to strike mid-render
CHUNK = 8
MB = 1024 * 1024


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """Head (2 CPUs) + node B (2 CPUs, one simulated GPU, its own TMPDIR)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    node_b_tmp = tmp_path_factory.mktemp("node-b-tmp")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False,
                        "object_store_memory": 150 * MB},
    )  # fmt: skip
    node_b = cluster.add_node(
        num_cpus=2, num_gpus=1, object_store_memory=150 * MB, env_vars={"TMPDIR": str(node_b_tmp)}
    )
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield SimpleNamespace(address=cluster.address, node_b=node_b, node_b_tmp=node_b_tmp)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def inputs(s3, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("s3-inputs")
    avatar = make_demo_avatar(root / "avatar", seconds=0.6, size_wh=(256, 192), seed=4)
    audio = write_audio(root / "speech.wav", synth_speech(SECONDS, seed=6))
    return {
        "avatar": Path(avatar.info.path),
        "audio": audio,
        "avatar_uri": s3.put_tree(avatar.info.path, "in/avatar"),
        "audio_uri": s3.put_file(audio, "in/speech.wav"),
    }


def _pool(**over) -> PoolConfig:
    # One ONNX Runtime thread per inference actor everywhere: the same kernels in every run.
    base = {"chunk_frames": CHUNK, "gpus_per_actor": 0.0, "cpus_per_inference_actor": 1.0}
    return PoolConfig(**{**base, **over})


def _config(models, **kw) -> RenderConfig:
    return RenderConfig(
        model=str(models["unet"]),
        audio_encoder=str(models["encoder"]),
        pool=kw.pop("pool", _pool()),
        **kw,
    )


def _flags(models) -> list[str]:
    return ["--model", str(models["unet"]), "--audio-encoder", str(models["encoder"]),
            "--chunk-frames", str(CHUNK), "--gpus-per-actor", "0",
            "--cpus-per-actor", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(cluster, small_models, inputs, tmp_path_factory):
    """The frames of a plain-path render of the same inputs."""
    out = tmp_path_factory.mktemp("s3-reference") / "plain.mp4"
    report = render(inputs["avatar"], inputs["audio"], out, _config(small_models))
    assert report.chunks == -(-report.frames // CHUNK) >= 8
    return _decode(out)


def _fetched(s3, key: str, tmp_path: Path) -> Path:
    local = tmp_path / Path(key).name
    s3.get_file(key, local)
    return local


def _segments(s3, work_key: str) -> int:
    """Segments in place on the store (not the temp objects of uploads under way)."""
    return sum(1 for k in s3.keys(f"{work_key}/segments/") if Path(k).name.startswith("chunk-"))


def _report(s3, key: str, tmp_path: Path) -> dict:
    return json.loads(_fetched(s3, key, tmp_path).read_text())


# ------------------------------------------------------------------------------ good paths


def test_cli_render_with_every_path_on_s3(s3, cluster, small_models, inputs, reference, tmp_path):
    argv = ["render", inputs["avatar_uri"], inputs["audio_uri"], "-o", s3.uri("a/out.mp4"),
            "--work-dir", s3.uri("a/work"), *_flags(small_models)]  # fmt: skip
    assert main(argv) == 0
    _same_video(_fetched(s3, "a/out.mp4", tmp_path), reference)
    report = _report(s3, "a/work/report.json", tmp_path)
    assert report["output"] == s3.uri("a/out.mp4") and report["work_dir"] == s3.uri("a/work")
    # Every chunk went up, the segments came down for the join: both timed.
    assert report["stages"]["ms_per_frame"]["upload"] > 0
    assert report["stages"]["ms_per_frame"]["download"] > 0
    # What is left on the store: the output, the manifest and the report; no probe file.
    assert s3.keys("a/") == [
        "a/out.mp4", "a/work/manifest.json", "a/work/report.json"
    ]  # fmt: skip
    assert main(argv) == 2  # the output exists now: the same check as for a plain path


def test_driver_killed_then_resumed_from_s3(s3, cluster, small_models, inputs, reference, tmp_path):
    """The CLI joins the module's cluster (``--address``); its environment, inherited, points
    it at the server. SIGKILLed once two segments are on the store; the same command again
    resumes from the manifest and chunk files it reads back from S3."""
    command = [*cli_command(), "render", inputs["avatar_uri"], inputs["audio_uri"],
               "-o", s3.uri("b/out.mp4"), "--work-dir", s3.uri("b/work"), "--keep-shards",
               *_flags(small_models), "--address", cluster.address]  # fmt: skip

    def two_segments() -> bool:
        return _segments(s3, "b/work") >= 2

    _kill_driver_when(
        command, tmp_path / "first.txt", two_segments, "no segments appeared", poll_s=0.05
    )
    segments_at_kill = _segments(s3, "b/work")
    assert segments_at_kill < len(reference) // CHUNK, "the first run finished before the kill"
    assert s3.keys("b/out.mp4") == []

    import subprocess

    second = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    report = _report(s3, "b/work/report.json", tmp_path)
    assert report["chunks_reused"] >= 2, report  # every segment on the store had its shard
    assert report["chunks_reused"] + report["chunks_rendered"] == report["chunks"]
    _same_video(_fetched(s3, "b/out.mp4", tmp_path), reference)


def test_render_batch_with_jobs_on_s3(s3, cluster, small_models, inputs, reference, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"audio": inputs["audio_uri"], "output": s3.uri("c/one.mp4"), "work_dir": s3.uri("c/w1")},
        {"audio": s3.uri("c/missing.wav"), "output": s3.uri("c/two.mp4")},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["render-batch", inputs["avatar_uri"], str(jobs), *_flags(small_models)]
    assert main(argv) == 2  # the one failure is a bad input
    summary = json.loads((tmp_path / "jobs.summary.json").read_text())
    ok, bad = summary["jobs"]
    assert ok["ok"] and ok["report"] == s3.uri("c/w1/report.json")
    assert not bad["ok"] and bad["exit_code"] == 2
    assert bad["error"] == f"audio file not found ({s3.uri('c/missing.wav')})"
    _same_video(_fetched(s3, "c/one.mp4", tmp_path), reference)
    assert s3.keys("c/two") == []


def test_split_placement_stages_the_avatar_once_per_node(
    s3, cluster, small_models, inputs, reference, tmp_path
):
    """Inference actors on node B (the GPU node), compositors on the head; the work directory
    on S3 and the avatar a URI (a fresh copy: nothing staged yet on either node)."""
    avatar = s3.put_tree(inputs["avatar"], "d/avatar")
    pool = _pool(inference_actors=2, gpus_per_actor=0.25, cpus_per_inference_actor=0.5,
                 compositors=2, placement=Placement.SPLIT)  # fmt: skip
    # node B's GPU is simulated (no CUDA behind it): its actors render on the CPU on purpose
    config = _config(small_models, pool=pool, work_dir=s3.uri("d/work"), allow_cpu_fallback=True)
    fetches = s3.requests.count("GET", f"/{s3.bucket}/d/avatar/avatar.json")
    report = render(avatar, inputs["audio_uri"], s3.uri("d/out.mp4"), config)

    nodes = {role: {a.node_id for a in report.actors if a.role == role}
             for role in ("inference", "compositor")}  # fmt: skip
    assert nodes["inference"] == {cluster.node_b.node_id}
    assert cluster.node_b.node_id not in nodes["compositor"]
    # Two nodes, two copies: the driver's on the head (its compositors use it), and one on
    # node B shared by both of its actors (they start together; one waits for the other).
    assert s3.requests.count("GET", f"/{s3.bucket}/d/avatar/avatar.json") - fetches == 2
    cache = cluster.node_b_tmp / f"lipsync-ray-{os.getuid()}" / "storage"
    staged = list((cache / "stage").glob("*/avatar"))
    assert len(staged) >= 1
    _same_video(_fetched(s3, "d/out.mp4", tmp_path), reference)


def test_server_restarted_mid_render(s3, cluster, small_models, inputs, reference, tmp_path):
    """The server goes away once two segments are up, for a second and until a request has
    failed against it (open connections cut, new ones dropped unanswered), and comes back
    with its objects: the failed requests are retried (S3_MAX_ATTEMPTS) and answered, and
    the render finishes with the same frames."""
    restarted: dict = {}

    def restart_when_two_segments() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not done.is_set():
            segments = _segments(s3, "e/work")
            if segments >= 2:
                restarted["logged"] = len(s3.requests.lines)
                restarted["dropped"] = s3.restart(down_s=1.0, until_dropped=1)
                restarted["segments"] = segments
                return
            time.sleep(0.05)

    done = threading.Event()
    watcher = threading.Thread(target=restart_when_two_segments, daemon=True)
    watcher.start()
    config = _config(small_models, work_dir=s3.uri("e/work"))
    try:
        report = render(inputs["avatar_uri"], inputs["audio_uri"], s3.uri("e/out.mp4"), config)
    finally:
        done.set()
        watcher.join()
    assert restarted, "the render ended before the server could be restarted"
    assert restarted["segments"] < report.chunks
    dropped = [line for line in restarted["dropped"] if line and not is_probe(line)]
    assert dropped, "no request reached the server while it was down"
    # The same request (method, key and query) was sent again and answered after the restart.
    retried = [line for line in dropped if s3.requests.answered(line, restarted["logged"])]
    assert retried, f"none of the failed requests was answered later: {dropped}"
    _same_video(_fetched(s3, "e/out.mp4", tmp_path), reference)


# ------------------------------------------------------------------------------- bad paths


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent_endpoint():
    """An endpoint that accepts connections and never answers (the kernel's backlog)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


# (case, avatar, audio, output, work dir, expected message, the URI it names); "A" and "W"
# stand for the good avatar and the good audio, None for the default work directory.
BAD = [
    ("output-bucket-missing", "A", "W", "s3://nobucket/out.mp4", None,
     "cannot write there: bucket not found", "s3://nobucket"),
    ("work-dir-bucket-missing", "A", "W", "s3://{b}/f/out.mp4", "s3://nobucket/work",
     "cannot write there: bucket not found", "s3://nobucket/work"),
    ("audio-key-missing", "A", "s3://{b}/f/missing.wav", "s3://{b}/f/out.mp4", None,
     "audio file not found", "s3://{b}/f/missing.wav"),
    ("audio-bucket-missing", "A", "s3://nobucket/a.wav", "s3://{b}/f/out.mp4", None,
     "audio file not found", "s3://nobucket/a.wav"),
    ("avatar-missing", "s3://{b}/f/no-avatar", "W", "s3://{b}/f/out.mp4", None,
     "avatar bundle directory not found", "s3://{b}/f/no-avatar"),
    ("wrong-credentials", "A", "W", "s3://{b}/f/out.mp4", None,
     "cannot read it: credentials refused or access denied", "W"),
    ("unreachable-endpoint", "A", "W", "s3://{b}/f/out.mp4", None,
     "cannot read it: cannot reach the endpoint {endpoint}: Could not connect to server", "W"),
    ("endpoint-times-out", "A", "W", "s3://{b}/f/out.mp4", None,
     "cannot read it: the endpoint {endpoint} did not answer within 1 s (2 attempts)", "W"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "avatar", "audio", "output", "work_dir", "message", "names"),
    BAD,
    ids=[row[0] for row in BAD],
)
def test_storage_failures_are_one_line_input_errors(
    case, avatar, audio, output, work_dir, message, names,
    s3, small_models, inputs, monkeypatch, capsys, request,
):  # fmt: skip
    """Exit 2 with one line naming the URI and the cause, before any model is loaded (so
    before Ray or an actor starts)."""
    import lipsync_ray.pipeline as pipeline

    def no_models(*_a, **_k):
        raise AssertionError("a model was loaded before the storage checks failed")

    monkeypatch.setattr(pipeline, "check_generator_model", no_models)
    # Short timeouts and two attempts: the same code path as the defaults, in seconds.
    monkeypatch.setattr(storage, "S3_CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_REQUEST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    endpoint = s3.endpoint
    if case == "unreachable-endpoint":
        endpoint = _closed_port()
    elif case == "endpoint-times-out":
        endpoint = request.getfixturevalue("silent_endpoint")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)

    def fill(text):
        if text is None:
            return None
        text = {"A": inputs["avatar_uri"], "W": inputs["audio_uri"]}.get(text, text)
        return text.format(b=s3.bucket, endpoint=endpoint)

    argv = ["render", fill(avatar), fill(audio), "-o", fill(output), *_flags(small_models)]
    if work_dir:
        argv += ["--work-dir", fill(work_dir)]
    if case == "wrong-credentials":
        key, _ = s3.iam_key()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with s3.iam_checks():
            code = main(argv)
    else:
        code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"lipsync-ray: error: {fill(message)}"), err
    assert err[0].endswith(f" ({fill(names)})"), err
    assert "curlCode" not in err[0] and "Request ID" not in err[0]
    assert s3.keys("f/") == []  # no probe file left, nothing written


def test_the_right_key_passes_the_iam_checks(s3, inputs):
    """The credentials row above is refused for its secret, not for IAM checks as such."""
    key, secret = s3.iam_key()
    with s3.iam_checks():
        fs = s3.filesystem(access_key=key, secret_key=secret)
        location = storage.Location(fs, f"{s3.bucket}/in/speech.wav", inputs["audio_uri"])
        assert storage.check_readable(location).size == inputs["audio"].stat().st_size
        storage.check_writable(location.parent())


def test_s3_filesystems_get_timeouts_and_retries_also_in_actors(s3):
    """pyarrow pickles an S3FileSystem without its retry strategy: a Location sets it again
    (checked through the options, retries through the restart test above)."""
    import pickle

    location = storage.resolve(s3.uri("in/speech.wav"))
    options = location.filesystem.__reduce__()[1][0]
    assert options["connect_timeout"] == storage.S3_CONNECT_TIMEOUT_S
    assert options["request_timeout"] == storage.S3_REQUEST_TIMEOUT_S
    assert options["endpoint_override"] == s3.endpoint and options["region"] == "us-east-1"
    again = pickle.loads(pickle.dumps(location))
    assert again == location and str(again) == s3.uri("in/speech.wav")
    assert again.filesystem.__reduce__()[1][0]["request_timeout"] == storage.S3_REQUEST_TIMEOUT_S


def test_check_job_paths_leaves_no_probe(s3, inputs):
    from lipsync_ray.workdir.job import check_job_paths

    check_job_paths(inputs["audio_uri"], s3.uri("g/out.mp4"), False, work_dir=s3.uri("g/work"))
    assert s3.keys("g/") == []


def test_store_failing_during_the_render_is_a_render_error(s3, monkeypatch):
    """Once the render runs, a store that fails (here: down while the driver mirrors the work
    directory) is a RenderError (exit 1) naming the URI and the cause, with the advice to run
    again."""
    from lipsync_ray.errors import RenderError

    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    from lipsync_ray.workdir.remote import RemoteWorkDir

    work = RemoteWorkDir(storage.resolve(s3.uri("h/work")), keep_shards=False)
    s3.stop()
    try:
        with pytest.raises(RenderError) as info:
            work.pull()
    finally:
        s3.start()
    message = str(info.value)
    assert message.startswith("cannot read the work directory: cannot reach the endpoint"), message
    assert message.endswith(f"run again to resume ({s3.uri('h/work')})"), message
