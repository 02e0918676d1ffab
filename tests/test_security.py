"""Security defaults: no pickles, no files read from outside the directories a user named, and
an embedded Ray cluster that does not listen beyond the loopback interface.

Each test builds the hostile input itself and checks the exact refusal, and where it matters
that the payload was never acted on (a pickle that would create a file, a secret file that
would be read as weights).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from helpers import cli_command
from onnx import TensorProto, helper, numpy_helper

from lipsync_ray.audio import load_features
from lipsync_ray.avatar import Avatar
from lipsync_ray.cli import main
from lipsync_ray.errors import InputError, ModelError
from lipsync_ray.inference import check_generator_model, check_model_file

# ---------------------------------------------------------------- features: no pickles


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickled_features(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    array = np.empty((4, 512), dtype=object)
    array[:] = 0.0
    array[0, 0] = _Payload(marker)
    path = tmp_path / "features.npy"
    np.save(path, array, allow_pickle=True)
    assert not marker.exists()
    return path, marker


def test_object_npy_features_are_refused_unread(tmp_path):
    path, marker = _pickled_features(tmp_path)
    with pytest.raises(InputError, match="pickles are refused") as info:
        load_features(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_object_npy_features_refused_by_the_cli_before_ray(good, tmp_path, capsys, monkeypatch):
    import ray

    def tripwire(*a, **k):
        raise AssertionError("ray.init was called before the features were rejected")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", tripwire)
    path, marker = _pickled_features(tmp_path)
    out = tmp_path / "out.mp4"
    rc = main(
        [
            "render",
            str(good["avatar"]),
            str(good["audio"]),
            "-o",
            str(out),
            "--model",
            str(good["model"]),
            "--features",
            str(path),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and str(path) in err and "pickles are refused" in err
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------- ONNX external data stays inside


def _tiny_model(path: Path, *, constant_k: bool = False, in_subgraph: bool = False) -> Path:
    """y = x + k, with k an initializer, an unnamed Constant attribute, or an initializer of
    an ``If`` branch: every place a tensor (and so external data) can live."""
    k = numpy_helper.from_array(np.array([1.0], np.float32), "k")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    if in_subgraph:
        branch_out = helper.make_tensor_value_info("k_out", TensorProto.FLOAT, [1])
        branch = helper.make_graph(
            [helper.make_node("Identity", ["k"], ["k_out"])], "branch", [], [branch_out], [k]
        )
        cond = numpy_helper.from_array(np.array(True), "cond")
        nodes = [
            helper.make_node("If", ["cond"], ["kk"], then_branch=branch, else_branch=branch),
            helper.make_node("Add", ["x", "kk"], ["y"]),
        ]
        graph = helper.make_graph(nodes, "g", [x], [y], [cond])
    elif constant_k:
        k.name = ""
        nodes = [
            helper.make_node("Constant", [], ["k"], value=k),
            helper.make_node("Add", ["x", "k"], ["y"]),
        ]
        graph = helper.make_graph(nodes, "g", [x], [y])
    else:
        graph = helper.make_graph([helper.make_node("Add", ["x", "k"], ["y"])], "g", [x], [y], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


def _externalise(path: Path, location: str) -> Path:
    """Point the model's tensor k (wherever it lives) at external data ``location``."""
    model = onnx.load(path)
    tensors = [*model.graph.initializer]
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            for sub in (attr.g,) if attr.HasField("g") else ():
                tensors.extend(sub.initializer)
    tensor = next(t for t in tensors if t.dims == [1] and t.data_type == TensorProto.FLOAT)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.external_data.add(key="location", value=location)
    onnx.save(model, path)
    return path


def _secret(tmp: Path) -> Path:
    (tmp / "outside").mkdir(exist_ok=True)
    secret = tmp / "outside" / "secret.bin"
    secret.write_bytes(np.array([42.0], np.float32).tobytes())
    return secret


def _case_dotdot(tmp: Path) -> Path:
    _secret(tmp)
    return _externalise(_tiny_model(tmp / "models" / "m.onnx"), "../outside/secret.bin")


def _case_absolute(tmp: Path) -> Path:
    return _externalise(_tiny_model(tmp / "models" / "m.onnx"), str(_secret(tmp)))


def _case_symlink_file(tmp: Path) -> Path:
    os.symlink(_secret(tmp), tmp / "models" / "weights.bin")
    return _externalise(_tiny_model(tmp / "models" / "m.onnx"), "weights.bin")


def _case_symlink_dir(tmp: Path) -> Path:
    _secret(tmp)
    os.symlink(tmp / "outside", tmp / "models" / "data", target_is_directory=True)
    return _externalise(_tiny_model(tmp / "models" / "m.onnx"), "data/secret.bin")


def _case_unnamed_constant(tmp: Path) -> Path:
    _secret(tmp)
    model = _tiny_model(tmp / "models" / "m.onnx", constant_k=True)
    return _externalise(model, "../outside/secret.bin")


def _case_subgraph(tmp: Path) -> Path:
    _secret(tmp)
    model = _tiny_model(tmp / "models" / "m.onnx", in_subgraph=True)
    return _externalise(model, "../outside/secret.bin")


@pytest.mark.parametrize(
    "make",
    [
        _case_dotdot,
        _case_absolute,
        _case_symlink_file,
        _case_symlink_dir,
        _case_unnamed_constant,
        _case_subgraph,
    ],
    ids=["dotdot", "absolute", "symlink-file", "symlink-dir", "unnamed-constant", "subgraph"],
)
def test_external_data_must_stay_in_the_model_directory(make, tmp_path):
    (tmp_path / "models").mkdir()
    path = make(tmp_path)
    for check in (check_model_file, check_generator_model):
        with pytest.raises(ModelError, match="must stay inside the model's directory") as info:
            check(path)
        assert str(path) in str(info.value)


def test_external_data_inside_the_directory_is_accepted(tmp_path):
    """The same model with its data next to it loads, and ONNX Runtime computes with it."""
    import onnxruntime as ort

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "k.bin").write_bytes(np.array([42.0], np.float32).tobytes())
    path = _externalise(_tiny_model(tmp_path / "models" / "m.onnx"), "k.bin")
    assert check_model_file(path) == path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.array([1.0], np.float32)})
    assert y.tolist() == [43.0]


# --------------------------------------------- avatar metadata paths stay in the bundle


def _edit_files(root: Path, name: str, value: str) -> None:
    meta = json.loads((root / "avatar.json").read_text())
    meta["files"][name] = value
    (root / "avatar.json").write_text(json.dumps(meta))


@pytest.fixture
def bundle(good, tmp_path) -> Path:
    return Path(shutil.copytree(good["avatar"], tmp_path / "bundle"))


def _outside_copy(bundle: Path, name: str) -> Path:
    """A valid copy of a bundle array outside the bundle (so only the location is wrong)."""
    target = bundle.parent / f"outside-{name}"
    shutil.copy(bundle / name, target)
    return target


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("name", ["frames", "crops", "visual_inputs"])
def test_avatar_files_cannot_escape_the_bundle(bundle, name, how):
    file = f"{name}.npy"
    outside = _outside_copy(bundle, file)
    if how == "dotdot":
        _edit_files(bundle, name, f"../{outside.name}")
    elif how == "absolute":
        _edit_files(bundle, name, str(outside))
    else:
        (bundle / file).unlink()
        os.symlink(outside, bundle / file)
    with pytest.raises(InputError, match="must stay inside the bundle") as info:
        Avatar.open(bundle)
    assert "avatar.json" in str(info.value)


def test_a_symlinked_bundle_directory_is_fine(bundle, tmp_path):
    """Only escaping files are refused: a link to the whole bundle (another disk) is normal."""
    os.symlink(bundle, tmp_path / "linked", target_is_directory=True)
    assert Avatar.open(tmp_path / "linked").frame_count == Avatar.open(bundle).frame_count


# ------------------------------------------------ the embedded Ray stays on the loopback

LOOPBACK_IPS = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _sockets(process: psutil.Process) -> set[tuple[str, int]]:
    """(ip, port) of every listening TCP socket and bound UDP socket of ``process``."""
    try:
        connections = process.net_connections(kind="inet")
    except psutil.Error:  # it ended meanwhile
        return set()
    return {
        (c.laddr.ip, c.laddr.port)
        for c in connections
        if c.laddr and (c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM)
    }


def _answer_without_token(port: int) -> int | str | None:
    """The HTTP status of a job-agent request with no token; None: not an HTTP server;
    "metrics": a page of Prometheus metrics (what Ray's metrics exporter serves on any path)."""
    url = f"http://127.0.0.1:{port}/api/job_agent/jobs/"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            if response.status == 200 and response.read(7) == b"# HELP ":
                return "metrics"
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, http.client.HTTPException):
        return None


@pytest.mark.ray
@pytest.mark.slow
def test_an_embedded_render_listens_on_loopback_only_with_a_token_and_quietly(good, tmp_path):
    """A real `lipsync-ray render` (no --address: it starts its own Ray) with RAY_AUTH_MODE
    set to ``disabled``: while it runs, every socket its process tree listens on (driver, GCS,
    raylet, agents, workers) is on the loopback interface, and Ray's agents refuse a request
    that carries no token. Its stderr holds its own log lines and nothing from Ray."""
    out = tmp_path / "out.mp4"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_AUTH_MODE"] = "disabled"  # the embedded cluster uses a token all the same
    argv = [*cli_command(), "render", str(good["avatar"]), str(good["audio"]), "-o", str(out),
            "--model", str(good["model"]), "--audio-encoder", str(good["encoder"]),
            "--chunk-frames", "8"]  # fmt: skip
    listening: dict[str, set[tuple[str, int]]] = {}  # process name -> sockets
    answers: dict[tuple[str, int], int | str | None] = {}  # (agent, port) -> status without a token
    with open(tmp_path / "stderr.txt", "w+") as err:
        render = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            root, deadline = psutil.Process(render.pid), time.monotonic() + 300
            while render.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(psutil.Error):
                    for process in [root, *root.children(recursive=True)]:
                        name = process.name()
                        found = _sockets(process)
                        listening.setdefault(name, set()).update(found)
                        if "Agent" not in name:
                            continue
                        # Ask again a port that did not answer HTTP: an agent binds its
                        # sockets before its HTTP server serves them.
                        for _, port in found:
                            if answers.get((name, port)) is None:
                                answers[name, port] = _answer_without_token(port)
                time.sleep(0.1)
        finally:
            if render.poll() is None:
                render.kill()
            render.wait(timeout=60)
        err.seek(0)
        stderr = err.read()
    assert render.returncode == 0, stderr[-3000:]
    assert out.is_file()
    # The sampling saw the cluster itself, not only the driver.
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {
        name for name, found in listening.items() if found
    }, listening
    outside = {name: sorted(found) for name, found in listening.items()
               if any(ip not in LOOPBACK_IPS for ip, _ in found)}  # fmt: skip
    assert not outside, outside
    # Token authentication: the runtime-env agent refuses every request. The dashboard agent
    # runs minimal: no HTTP server, so no job route (a 405 would be that route without a token
    # check). Its one HTTP port is Ray's metrics exporter, read-only, on the loopback interface
    # like every other socket: Prometheus scrapes it without a token.
    statuses = {(name, status) for (name, _), status in answers.items()}
    assert {s for n, s in statuses if n == "ray::DashboardAgent"} <= {"metrics", None}, answers
    assert {s for name, s in statuses if name == "ray::RuntimeEnvAgent"} == {401}, answers
    # Nothing from Ray on stderr (no "Token authentication is enabled ..."): only this
    # package's log lines.
    lines = stderr.strip().splitlines()
    own = re.compile(r"(INFO|WARNING) lipsync_ray[.\w]*: ")
    assert lines and all(own.match(line) for line in lines), stderr
