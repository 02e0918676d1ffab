"""The warm part of a :class:`~lipsync_ray.pipeline.Renderer`: what it resolves once per avatar
and models, when Ray is up, and every render it serves then uses unchanged.

::

    check_gpu_request(config)            before Ray starts (an embedded cluster): a GPU-only
                                         provider this machine cannot load stops here
    start_pools(ray, config, avatar)     Pools: the pool sized for the cluster (cluster_pool,
                                         cluster_sizing), the generator's precision
                                         (prepare_generator) and the actors, started, not
                                         waited for
    describe_actors(ray, pools)          wait until every actor has opened its session
    check_cpu_fallback(infos, config)    refuse inference actors that fell back to the CPU
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipsync_ray.avatar import Avatar
from lipsync_ray.config import PoolConfig, RenderConfig
from lipsync_ray.errors import InputError
from lipsync_ray.fileio import file_sha256
from lipsync_ray.inference import GPU_PROVIDERS, Provider, provider_library_error, requires_gpu
from lipsync_ray.precision import (
    Precision,
    PreparedModel,
    cached_calibration_features,
    default_cache_dir,
    prepare_model,
)
from lipsync_ray.report import ActorInfo
from lipsync_ray.scheduler import ACTOR_START_TIMEOUT_S, gather, start_actors
from lipsync_ray.storage import Location

__all__ = [
    "FALLBACK_HINT",
    "Pools",
    "check_cpu_fallback",
    "check_gpu_request",
    "cluster_pool",
    "cluster_sizing",
    "describe_actors",
    "prepare_generator",
    "start_pools",
]

log = logging.getLogger(__name__)


def cluster_pool(pool: PoolConfig, ray, *, chunks: int | None = None) -> PoolConfig:
    """``pool`` with its automatic values resolved for the connected Ray cluster (capped at
    ``chunks``, the chunks it will ever render, when known)."""
    return pool.resolved(*_cluster_totals(ray), chunks=chunks)


def cluster_sizing(pool: PoolConfig, ray, *, chunks: int | None = None) -> str:
    """How :func:`cluster_pool` sized ``pool`` for the connected cluster (one line)."""
    return pool.explain(*_cluster_totals(ray), chunks=chunks)


def _cluster_totals(ray) -> tuple[float, float]:
    resources = ray.cluster_resources()
    return resources.get("CPU", 1.0), resources.get("GPU", 0.0)


FALLBACK_HINT = "--allow-cpu-fallback renders on the CPU anyway"


def check_gpu_request(config: RenderConfig) -> None:
    """On the driver, before Ray starts: a render asked for a GPU provider alone
    (``--providers cuda``) stops here when this machine cannot load it (the CPU-only
    onnxruntime, or CUDA libraries the provider needs and the loader cannot find).

    Only for an embedded cluster: then this machine is the one the actors run on. A joined
    cluster's GPUs may sit on other nodes, so there the actors report instead (see
    :func:`check_cpu_fallback`). No CUDA context is created here.

    Raises:
        InputError: one line naming the provider and ONNX Runtime's reason.
    """
    if config.allow_cpu_fallback or not requires_gpu(config.session):
        return
    wanted = [p for p in config.session.providers if p in GPU_PROVIDERS]
    errors = {p: provider_library_error(p) for p in wanted}
    if any(reason is None for reason in errors.values()):
        return
    provider = Provider.CUDA if Provider.CUDA in errors else wanted[0]
    raise InputError(
        f"{provider.value} was requested (--providers) but cannot be used on this machine: "
        f"{errors[provider]} ({FALLBACK_HINT})"
    )


def prepare_generator(
    config: RenderConfig,
    pool: PoolConfig,
    avatar: Avatar | str | Path,
    features: np.ndarray | None = None,
) -> PreparedModel:
    """The generator a render with ``config`` and the resolved ``pool`` loads: FP32 as given,
    or the gated INT8/FP16 version from :func:`~lipsync_ray.precision.prepare_model` (made
    once, then cached). ``features`` calibrate when there is no audio encoder to make them."""
    if config.precision is Precision.FP32:
        return PreparedModel(Path(config.model), Precision.FP32, Precision.FP32, None, False)
    gpu = bool(pool.gpus_per_actor) and any(p is not Provider.CPU for p in config.session.providers)
    avatar = avatar if isinstance(avatar, Avatar) else Avatar.open(avatar)
    if config.audio_encoder:
        cache = config.precision_cache or default_cache_dir(avatar)
        features = cached_calibration_features(config.audio_encoder, cache)
    prepared = prepare_model(
        config.model,
        avatar,
        config.precision,
        provider_is_gpu=gpu,
        features=features,
        cache_dir=config.precision_cache,
        threshold_db=config.precision_threshold_db,
        session=config.session if gpu else None,
    )
    log.info("generator precision: %s", prepared.to_dict())
    return prepared


@dataclass(frozen=True)
class Pools:
    """What a :class:`~lipsync_ray.pipeline.Renderer` resolves once per avatar and models, when
    Ray is up, and every render it serves then uses unchanged (:func:`start_pools`)."""

    pool: PoolConfig  # resolved for the cluster (and capped at the one render's chunks: once)
    sizing: str  # how the automatic values were chosen (report: settings.pool_sizing)
    model: PreparedModel  # the generator the inference actors load (FP32, INT8 or FP16)
    model_sha: str  # SHA-256 of its file, in every render's fingerprint
    inference: tuple  # InferenceActor handles
    compositors: tuple  # CompositorActor handles
    describing: tuple  # ObjectRef[ActorInfo] of every actor's describe(): answered once started

    @property
    def actors(self) -> tuple:
        return self.inference + self.compositors


def start_pools(
    ray,
    config: RenderConfig,
    avatar: Avatar,
    location: Location | None,
    *,
    chunks: int | None,
    calibration: np.ndarray | None,
) -> Pools:
    """On the driver, with Ray connected: resolve ``config.pool`` for the cluster (automatic
    sizes capped at ``chunks``, the chunks the pools will ever render, when known), prepare
    the generator's precision (``calibration``: precomputed features, when there is no audio
    encoder to make them) and create the actors without waiting for them.

    ``location``: the avatar's, when it was staged (each node stages its own copy).

    Raises:
        InputError: a GPU provider alone was asked for and the pool gets no GPU.
    """
    pool = cluster_pool(config.pool, ray, chunks=chunks)
    sizing = cluster_sizing(config.pool, ray, chunks=chunks)
    log.info("actor pools: %s", sizing)
    if requires_gpu(config.session) and not pool.gpus_per_actor and not config.allow_cpu_fallback:
        names = ", ".join(p.value for p in config.session.providers)
        raise InputError(
            f"{names} was requested (--providers) but the Ray cluster has no GPUs "
            f"or --gpus-per-actor is 0 ({FALLBACK_HINT})"
        )
    prepared = prepare_generator(config, pool, avatar, calibration)
    model_sha = file_sha256(prepared.path)
    inference, compositors = start_actors(
        ray,
        pool,
        str(prepared.path.resolve()),
        location or str(Path(avatar.path).resolve()),
        prepared.session_options(config.session),
        config.encode,
    )
    describing = tuple(a.describe.remote() for a in inference + compositors)
    return Pools(pool, sizing, prepared, model_sha, tuple(inference), tuple(compositors),
                 describing)  # fmt: skip


def describe_actors(ray, pools: Pools) -> tuple[ActorInfo, ...]:
    """Wait until every actor of ``pools`` has opened its session (at most
    ``ACTOR_START_TIMEOUT_S``); what each reported, with CPU fallbacks and CUDA arena limits
    logged."""
    infos = tuple(gather(ray, list(pools.describing), ACTOR_START_TIMEOUT_S))
    for info in infos:
        if info.cpu_fallback:
            log.warning("%s (pid %d) runs on the CPU instead of a GPU: %s", info.name,
                        info.pid, info.cpu_fallback)  # fmt: skip
        if info.gpu_mem_limit_bytes:
            log.info("%s on GPU %s: CUDA arena limited to %.1f GiB", info.name,
                     ",".join(info.gpu_ids), info.gpu_mem_limit_bytes / 2**30)  # fmt: skip
    return infos


def check_cpu_fallback(infos: Sequence[ActorInfo], config: RenderConfig) -> None:
    """Refuse to render on inference actors that got a GPU but run on the CPU, unless
    ``config.allow_cpu_fallback``.

    Raises:
        InputError: naming the first such actor and its reason.
    """
    fallbacks = [i for i in infos if i.cpu_fallback]
    if fallbacks and not config.allow_cpu_fallback:
        first, more = fallbacks[0], len(fallbacks) - 1
        others = f" (and {more} more inference actors)" if more else ""
        raise InputError(
            f"CUDA could not be used by {first.name}{others}, which would render on the "
            f"CPU: {first.cpu_fallback} ({FALLBACK_HINT})"
        )
