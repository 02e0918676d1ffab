"""Reduced precision for the generator: INT8 on the CPU, FP16 on the GPU, behind a quality gate.

:func:`prepare_model` runs on the driver once per render, before any actor starts; actors only
load the path it returns (``PreparedModel.path``). What it picks::

    requested   CPU provider                          GPU (CUDA / TensorRT)
    fp32        the model as given                    the model as given
    int8        static INT8 (QDQ), gated              the same, with a warning (CPU-tuned)
    fp16        FP16 ONNX, gated, with a warning      FP16 ONNX + TensorRT fp16 flag, gated
    auto        int8 if it passes the gate, else fp32 fp16 if it passes the gate, else fp32

**Failure rule.** ``auto`` never makes a render fail that FP32 would run: a model that fails
the gate, or cannot be produced or cached, falls back to FP32 with one warning and the reason
in ``PreparedModel.note``. An explicitly requested ``int8``/``fp16`` never silently becomes
something else: a failed gate raises :class:`ModelError` with the measured PSNR.

**Calibration (INT8).** ONNX Runtime static quantisation (:mod:`lipsync_ray.quantize`, see
:class:`~lipsync_ray.quantize.Int8Options`) on the
avatar's own prepared visual inputs (``visual_inputs.npy``, exactly what actors feed the
model) paired with audio windows of ``features``. Recommended: :func:`calibration_features`,
seeded synthetic speech through the *real* audio encoder. Its output has the distribution the
generator's audio branch sees (non-negative, smoothed encoder features), and it does not
depend on the render's audio, so one calibration serves every render of a (model, avatar,
encoder). With precomputed features and no encoder, pass the render's features (the cache
then keys on them). ``None`` uses seeded rectified noise (tests and benchmarks only).

**Quality gate.** Held-out avatar frames (evenly spread, never calibrated on, nor their direct
neighbours) run through the FP32 model (CPU provider) and the reduced one; both outputs become
uint8 exactly as in the compositor, and the PSNR is measured in the face region (the
generated mouth rectangle of the ROI, ``FACE_RECT_XYWH``). The gated value is the *worst*
held-out frame's PSNR, so a model cannot pass on average while breaking some poses; the
pooled PSNR is recorded too. Default threshold 35 dB.

**Cache.** ``<avatar>/.cache/precision/<precision>-<key>/{model.onnx, meta.json}`` by default:
the model is calibrated on that avatar, and actors on other nodes reach it exactly when they
reach the avatar. The key hashes the model (and its external data), the avatar
(``avatar.json`` and the prepared inputs of every frame calibration and gate read), the
features, the settings and the onnx/onnxruntime versions. The threshold is not in the key:
the cached PSNR is compared again. Entries are built in a temporary directory and renamed into
place, checked by SHA-256 on every hit and rebuilt when corrupt. Nothing is pruned (an INT8
UNet-328 is ~3.5 MB); deleting the directory between renders is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lipsync_ray import audio as audio_mod
from lipsync_ray.avatar import META_NAME, Avatar
from lipsync_ray.composite import MASK_RECT_XYWH
from lipsync_ray.contract import FEATURE_CONTEXT, FEATURE_DIM, FRAME_SIZE
from lipsync_ray.errors import InputError, ModelError
from lipsync_ray.fileio import atomic_path, file_sha256, write_json
from lipsync_ray.inference import (
    EncoderSession,
    GeneratorSession,
    Provider,
    SessionOptions,
    check_model_file,
)
from lipsync_ray.options import Precision
from lipsync_ray.quantize import Int8Options, QuantFormat, convert_fp16, quantize_int8

__all__ = [
    "GateResult",
    "Int8Options",
    "Precision",
    "PreparedModel",
    "QuantFormat",
    "cached_calibration_features",
    "calibration_features",
    "convert_fp16",
    "default_cache_dir",
    "face_psnr",
    "prepare_model",
    "quality_gate",
    "quantize_int8",
    "split_frames",
]

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the entry layout or the recipe changes
DEFAULT_THRESHOLD_DB = 35.0
PSNR_CAP_DB = 100.0  # zero error: finite, so the report stays valid JSON
GUARD_FRAMES = 1  # calibration skips the direct neighbours of a held-out frame (40 ms at 25 fps)
# The face region of a prediction: the mouth rectangle the model generates (rows 5..309,
# columns 5..314 of the 320x320 ROI); the 5-pixel border around it is copied input.
FACE_RECT_XYWH = MASK_RECT_XYWH
_X, _Y, _W, _H = FACE_RECT_XYWH
_FACE = (slice(None), slice(_Y, _Y + _H), slice(_X, _X + _W))  # index of (k, 320, 320, 3)
_GATE_BATCH = 4


@dataclass(frozen=True)
class GateResult:
    """The quality gate's verdict on one reduced-precision model."""

    precision: Precision
    psnr_db: float  # face-region PSNR of the worst held-out frame (the gated value)
    mean_psnr_db: float  # face-region PSNR pooled over all held-out frames
    threshold_db: float
    passed: bool
    frames: int  # held-out frames compared
    provider: str = ""  # provider that ran the reduced model

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision.value}


@dataclass(frozen=True)
class PreparedModel:
    """What the actors should load, and why."""

    path: Path  # model file for every inference actor
    precision: Precision  # what runs: FP32, INT8 or FP16 (never AUTO)
    requested: Precision
    gate: GateResult | None  # None for FP32 as asked; kept when a failed gate forced FP32
    cached: bool  # the reduced model came from the cache (no quantisation this time)
    note: str = ""  # why ``precision`` differs from ``requested``, if it does

    def session_options(self, base: SessionOptions) -> SessionOptions:
        """``base`` with the TensorRT FP16 flag set when FP16 runs (CUDA ignores it)."""
        return replace(base, trt_fp16=True) if self.precision is Precision.FP16 else base

    def to_dict(self) -> dict:
        """JSON-ready record for the run report."""
        return {
            "requested": self.requested.value,
            "precision": self.precision.value,
            "model": str(self.path),
            "cached": self.cached,
            "gate": self.gate.to_dict() if self.gate else None,
            "note": self.note,
        }


# ---------------------------------------------------------------------------- inputs and gate


def calibration_features(
    audio_encoder: str | Path, *, seconds: float = 8.0, seed: int = 0
) -> np.ndarray:
    """Calibration audio: seeded synthetic speech through the real encoder (one CPU thread, so
    the bytes, hence the cache key, are reproducible). Returns float32 (N, 512),
    docs/model-and-audio.md §3.3."""
    mel = audio_mod.mel_spectrogram(audio_mod.synth_speech(seconds, seed=seed))
    options = SessionOptions(providers=(Provider.CPU,), intra_op_threads=1)
    return audio_mod.compute_features(mel, EncoderSession(Path(audio_encoder), options, cpus=1))


def default_cache_dir(avatar: Avatar) -> Path:
    """``<avatar>/.cache/precision``: where reduced models of this avatar are kept."""
    return avatar.path / ".cache" / "precision"


def cached_calibration_features(
    audio_encoder: str | Path, cache_dir: str | Path, *, seconds: float = 8.0, seed: int = 0
) -> np.ndarray:
    """:func:`calibration_features`, kept in ``cache_dir`` as
    ``calibration-<key>.npy``: a render whose reduced model is cached then skips running the
    encoder (0.2 s on 2 CPUs). The key hashes the encoder's files, ``seconds``, ``seed`` and
    the onnxruntime version. A file that does not load as finite float32 (N, 512) is made
    again; one that cannot be written only costs the next render the encoder run again."""
    import onnxruntime as ort

    encoder = check_model_file(audio_encoder)
    parts = [CACHE_VERSION, file_sha256(*_model_files(encoder)), seconds, seed, ort.__version__]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"calibration-{key}.npy"
    try:
        features = np.load(path, allow_pickle=False)
        if (
            features.dtype == np.float32
            and features.ndim == 2
            and features.shape[1] == audio_mod.FEATURE_DIM
            and np.isfinite(features).all()
        ):
            return features
    except (OSError, ValueError):
        pass
    features = calibration_features(encoder, seconds=seconds, seed=seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, features, allow_pickle=False)
    except OSError as exc:
        log.warning("could not cache the calibration features in %s: %s", path.parent, exc)
    return features


def split_frames(
    frame_count: int, calibration_frames: int, holdout_frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """Choose calibration and held-out avatar frames; the two never overlap.

    Held out: ``min(holdout_frames, max(1, frame_count // 4))`` frames, evenly spread.
    Calibration: up to ``calibration_frames`` of the others, evenly spread, skipping frames
    within ``GUARD_FRAMES`` of a held-out one (unless that leaves none).

    Returns:
        (calibration, holdout): sorted int64 arrays of avatar frame indices.
    """
    if calibration_frames < 1 or holdout_frames < 1:
        raise InputError(
            f"calibration and held-out frames must be >= 1, got {calibration_frames} "
            f"and {holdout_frames}"
        )
    if frame_count < 2:
        raise InputError(
            "reduced precision needs an avatar of at least 2 frames (calibration + a held-out "
            f"frame), got {frame_count}"
        )
    h = min(holdout_frames, max(1, frame_count // 4))
    holdout = np.unique(((np.arange(h) + 0.5) * frame_count / h).astype(np.int64))
    distance = np.abs(np.arange(frame_count)[:, None] - holdout[None, :]).min(axis=1)
    candidates = np.flatnonzero(distance > GUARD_FRAMES)
    if candidates.size == 0:
        candidates = np.flatnonzero(distance > 0)
    pick = np.linspace(0, candidates.size - 1, min(calibration_frames, candidates.size))
    return candidates[np.unique(np.round(pick).astype(np.int64))], holdout


def _audio_for(features: np.ndarray | None, k: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (k, 32, 16, 16) windows of ``features`` at evenly spread rows, shuffled."""
    if features is None:
        noise = np.maximum(rng.standard_normal((k + FEATURE_CONTEXT + 2, FEATURE_DIM)), 0.0)
        features = ((noise[:-2] + noise[1:-1] + noise[2:]) / 3.0).astype(np.float32)
    rows = np.round(np.linspace(0, len(features) - 1, k)).astype(np.int64)
    return audio_mod.audio_windows(features, rng.permutation(rows))


def face_psnr(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-frame PSNR (dB, peak 255) of ``candidate`` against ``reference`` in the face region.

    Args:
        reference, candidate: uint8 (k, 320, 320, 3) BGR predictions (not modified).

    Returns:
        float64 (k,); a frame with zero error gets ``PSNR_CAP_DB``.
    """
    if reference.shape != candidate.shape or reference.shape[1:3] != (FRAME_SIZE, FRAME_SIZE):
        raise InputError(
            f"expected two (k, 320, 320, 3) arrays, got {reference.shape} and {candidate.shape}"
        )
    diff = reference[_FACE].astype(np.float64) - candidate[_FACE]
    mse = (diff**2).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.minimum(10.0 * np.log10(255.0**2 / mse), PSNR_CAP_DB)


def _predict(session: GeneratorSession, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
    # uint8 out, exactly as the inference actors make it (through the graph-I/O wrapper when
    # the session has it), so the gate judges what a render produces.
    b = _GATE_BATCH
    runs = [session.predict(visual[i : i + b], audio[i : i + b]) for i in range(0, len(visual), b)]
    return np.concatenate(runs)


def quality_gate(
    reference: str | Path,
    candidate: str | Path,
    visual: np.ndarray,
    audio: np.ndarray,
    *,
    precision: Precision,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
    options: SessionOptions | None = None,
    threads: int = 0,
) -> GateResult:
    """Compare ``candidate`` with the FP32 ``reference`` on held-out inputs.

    Args:
        reference: the FP32 model (runs on the CPU provider).
        candidate: the reduced-precision model (runs with ``options``; default CPU).
        visual: uint8 (k, 320, 320, 6) held-out visual inputs. Not mutated.
        audio: float32 (k, 32, 16, 16) audio windows. Not mutated.
        precision: what ``candidate`` is (recorded in the result).
        threshold_db: the worst frame's face-region PSNR must be >= this.
        threads: intra-op threads of both sessions (0: one per CPU of this machine).
    """
    cpus = threads or os.cpu_count() or 1
    cpu = SessionOptions(providers=(Provider.CPU,))
    expected = _predict(GeneratorSession(reference, cpu, cpus=cpus), visual, audio)
    session = GeneratorSession(candidate, options or cpu, cpus=cpus)
    got = _predict(session, visual, audio)
    per_frame = face_psnr(expected, got)
    mse = float(np.mean((expected[_FACE].astype(np.float64) - got[_FACE]) ** 2))
    pooled = PSNR_CAP_DB if mse == 0 else min(10.0 * math.log10(255.0**2 / mse), PSNR_CAP_DB)
    worst = float(per_frame.min())
    return GateResult(
        precision=precision,
        psnr_db=worst,
        mean_psnr_db=pooled,
        threshold_db=float(threshold_db),
        passed=worst >= threshold_db,
        frames=len(per_frame),
        provider=session.providers[0] if session.providers else "",
    )


# ---------------------------------------------------------------------------- cache


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _model_files(model: Path) -> list[Path]:
    """The model file and the external-data files it names (sorted)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    external = {
        e.value
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return [model, *(model.parent / loc for loc in sorted(external))]


def _load_entry(entry: Path, key: str) -> dict | None:
    """The entry's metadata if it is complete and its model matches its recorded hash."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta["key"] == key and file_sha256(entry / "model.onnx") == meta["sha256"]:
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _store_entry(entry: Path, key: str, build) -> dict:
    """Build an entry in a temporary sibling directory (``build(tmp) -> meta``), rename it in.

    A concurrent writer's valid entry wins (it is equivalent, and may be in use); a stale or
    corrupt one is moved aside and removed.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        meta = build(tmp)
        meta = {**meta, "key": key, "sha256": file_sha256(tmp / "model.onnx")}
        write_json(tmp / "meta.json", meta, fsync=True, indent=2, sort_keys=True)
        if (theirs := _load_entry(entry, key)) is not None:
            return theirs
        if entry.exists():
            stale = entry.parent / f".stale-{uuid.uuid4().hex}"
            os.replace(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, entry)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- the driver's call


@dataclass(frozen=True)
class _Request:
    model: Path
    target: Precision  # INT8 or FP16
    requested: Precision
    provider_is_gpu: bool
    cache_dir: Path
    threshold_db: float
    calibration_frames: int
    holdout_frames: int
    seed: int
    int8: Int8Options
    session: SessionOptions
    threads: int


def _check_args(threshold_db: float, calibration_frames: int, holdout_frames: int, features):
    if not (isinstance(threshold_db, int | float) and 0 < threshold_db <= PSNR_CAP_DB):
        raise InputError(f"PSNR threshold must be in (0, {PSNR_CAP_DB}] dB, got {threshold_db!r}")
    for name, value in (("calibration", calibration_frames), ("held-out", holdout_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} frames must be an integer >= 1, got {value!r}")
    shape = getattr(features, "shape", (0, 512))
    if features is not None and (len(shape) != 2 or shape[1] != FEATURE_DIM or shape[0] < 1):
        raise InputError(f"calibration features must be (N >= 1, 512), got {shape}")


def prepare_model(
    model: str | Path,
    avatar: Avatar | str | Path,
    precision: Precision | str,
    *,
    provider_is_gpu: bool,
    features: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    threshold_db: float = DEFAULT_THRESHOLD_DB,
    calibration_frames: int = 64,
    holdout_frames: int = 16,
    seed: int = 0,
    int8: Int8Options = Int8Options(),
    session: SessionOptions | None = None,
    threads: int = 0,
) -> PreparedModel:
    """Decide which generator the actors load; quantise/convert and gate it, or reuse the cache.

    Runs on the driver once per render, before the actors start (rules: module docstring).
    A cache miss costs one calibration pass over ``calibration_frames`` frames plus FP32 and
    reduced inference over ``holdout_frames``; a hit costs hashing the model and reading the
    prepared inputs of those frames.

    Args:
        model: the FP32 generator.
        avatar: the render's avatar (or its bundle path); its prepared visual inputs calibrate
            and gate.
        precision: what the user asked for (``auto`` picks by ``provider_is_gpu``).
        provider_is_gpu: the actors will run CUDA or TensorRT (else the CPU provider).
        features: float32 (N, 512) audio features for the audio windows (not mutated), see
            :func:`calibration_features`; None: seeded rectified noise.
        cache_dir: default ``<avatar>/.cache/precision``.
        threshold_db: minimum face-region PSNR of the worst held-out frame.
        session: how the gate runs the reduced model (default: the CPU provider; on a GPU, the
            default provider list with the TensorRT fp16 flag).
        threads: intra-op threads of the gate's sessions (0: one per CPU).

    Raises:
        InputError: bad arguments. ModelError: an explicitly requested precision failed the
            gate or could not be produced.
    """
    requested = Precision.parse(precision)
    _check_args(threshold_db, calibration_frames, holdout_frames, features)
    model = check_model_file(model)
    avatar = avatar if isinstance(avatar, Avatar) else Avatar.open(avatar)
    if requested is Precision.FP32:
        return PreparedModel(model, Precision.FP32, requested, None, cached=False)
    target = requested
    if requested is Precision.AUTO:
        target = Precision.FP16 if provider_is_gpu else Precision.INT8
    elif target is Precision.INT8 and provider_is_gpu:
        log.warning("INT8 was requested on a GPU provider: it is tuned for the CPU provider")
    elif target is Precision.FP16 and not provider_is_gpu:
        log.warning("FP16 was requested on the CPU provider, which emulates it (slower than FP32)")
    if session is None:
        gpu = SessionOptions(trt_fp16=True)
        session = gpu if provider_is_gpu else SessionOptions(providers=(Provider.CPU,))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(avatar)
    if target is Precision.INT8:  # the key holds what the quantiser is given
        int8 = int8.resolved()
    request = _Request(
        model, target, requested, provider_is_gpu, root, float(threshold_db),
        calibration_frames, holdout_frames, seed, int8, session, threads,
    )  # fmt: skip
    try:
        prepared = _prepare_reduced(request, avatar, features)
    except (ModelError, OSError) as exc:
        if requested is not Precision.AUTO:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"cannot prepare the {target.value} model: {exc}", path=model) from exc
        note = f"{target.value} could not be prepared ({exc}); running fp32"
        log.warning("precision auto: %s", note)
        return PreparedModel(model, Precision.FP32, requested, None, cached=False, note=note)
    gate = prepared.gate
    if gate is not None and not gate.passed:
        verdict = (
            f"{target.value} failed the quality gate: face-region PSNR {gate.psnr_db:.1f} dB on "
            f"the worst of {gate.frames} held-out avatar frames, expected >= "
            f"{gate.threshold_db:.1f} dB"
        )
        if requested is not Precision.AUTO:
            raise ModelError(
                f"{verdict}; use precision fp32 or auto, or a lower threshold", path=model
            )
        log.warning("precision auto: %s; running fp32", verdict)
        note = f"{verdict}; ran fp32"
        return PreparedModel(model, Precision.FP32, requested, gate, prepared.cached, note)
    return prepared


def _prepare_reduced(r: _Request, avatar: Avatar, features: np.ndarray | None) -> PreparedModel:
    import onnx
    import onnxruntime as ort

    calib_idx, hold_idx = split_frames(avatar.frame_count, r.calibration_frames, r.holdout_frames)
    calib_visual = avatar.read_visual_inputs(calib_idx)
    hold_visual = avatar.read_visual_inputs(hold_idx)
    rng = np.random.default_rng(r.seed)
    calib_audio = _audio_for(features, len(calib_idx), rng)
    hold_audio = _audio_for(features, len(hold_idx), rng)
    avatar_digest = hashlib.sha256((avatar.path / META_NAME).read_bytes())
    for block in (calib_visual, hold_visual):
        avatar_digest.update(block.data)
    parts = {
        "version": CACHE_VERSION,
        "precision": r.target.value,
        "model": file_sha256(*_model_files(r.model)),
        "avatar": avatar_digest.hexdigest(),
        "features": None if features is None else _array_sha256(features),
        "frames": [r.calibration_frames, r.holdout_frames, r.seed],
        "int8": json.loads(json.dumps(asdict(r.int8), default=lambda e: e.value))
        if r.target is Precision.INT8
        else None,
        "gate": [[p.value for p in r.session.providers], r.session.trt_fp16, r.provider_is_gpu],
        "versions": [onnx.__version__, ort.__version__],
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    entry = r.cache_dir / f"{r.target.value}-{key}"

    def build(tmp: Path) -> dict:
        out = tmp / "model.onnx"
        if r.target is Precision.INT8:
            log.info("quantising %s to INT8 on %d avatar frames", r.model.name, len(calib_idx))
            quantize_int8(r.model, out, calib_visual, calib_audio, r.int8)
        else:
            log.info("converting %s to FP16", r.model.name)
            convert_fp16(r.model, out)
        gate = quality_gate(
            r.model, out, hold_visual, hold_audio, precision=r.target,
            threshold_db=r.threshold_db, options=r.session, threads=r.threads,
        )  # fmt: skip
        log.info("%s gate: worst held-out frame %.2f dB", r.target.value, gate.psnr_db)
        return {
            "parts": parts,
            "gate": gate.to_dict(),
            "calibration_frames": calib_idx.tolist(),
            "holdout_frames": hold_idx.tolist(),
        }

    meta = _load_entry(entry, key)
    cached = meta is not None
    if meta is None:
        meta = _store_entry(entry, key, build)
    else:
        log.info("reusing the cached %s model %s", r.target.value, entry)
    psnr = float(meta["gate"]["psnr_db"])  # compared again: the threshold is not in the key
    verdict = {
        "precision": r.target,
        "threshold_db": r.threshold_db,
        "passed": psnr >= r.threshold_db,
    }
    gate = GateResult(**{**meta["gate"], **verdict})
    return PreparedModel(entry / "model.onnx", r.target, r.requested, gate, cached)
