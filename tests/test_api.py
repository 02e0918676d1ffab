"""The public API at the package root: exactly these names, each the object of its module."""

from __future__ import annotations

import importlib

import pytest

import lipsync_ray

PUBLIC = {
    "render": "lipsync_ray.pipeline",
    "Renderer": "lipsync_ray.pipeline",
    "render_batch": "lipsync_ray.batch",
    "RenderConfig": "lipsync_ray.config",
    "PoolConfig": "lipsync_ray.config",
    "RunReport": "lipsync_ray.report",
    "LipsyncError": "lipsync_ray.errors",
    "InputError": "lipsync_ray.errors",
    "ModelError": "lipsync_ray.errors",
    "RenderError": "lipsync_ray.errors",
    "EncodeError": "lipsync_ray.errors",
    "ShardError": "lipsync_ray.errors",
    "Cancelled": "lipsync_ray.errors",
}


def test_all_is_pinned() -> None:
    assert lipsync_ray.__all__ == [
        "Cancelled",
        "EncodeError",
        "InputError",
        "LipsyncError",
        "ModelError",
        "PoolConfig",
        "RenderConfig",
        "RenderError",
        "Renderer",
        "RunReport",
        "ShardError",
        "render",
        "render_batch",
    ]
    assert set(lipsync_ray.__all__) == set(PUBLIC)


@pytest.mark.parametrize(("name", "module"), PUBLIC.items())
def test_root_names_are_their_modules_objects(name: str, module: str) -> None:
    assert getattr(lipsync_ray, name) is getattr(importlib.import_module(module), name)
    assert name in dir(lipsync_ray)


def test_errors_derive_from_the_root_error() -> None:
    for name in (
        "InputError",
        "ModelError",
        "RenderError",
        "EncodeError",
        "ShardError",
        "Cancelled",
    ):
        assert issubclass(getattr(lipsync_ray, name), lipsync_ray.LipsyncError)


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("Avatar", "lipsync_ray.avatar"),
        ("load_audio", "lipsync_ray.audio"),
        ("mel_spectrogram", "lipsync_ray.audio"),
        ("synth_speech", "lipsync_ray.dev.speech"),
        ("build_model", "lipsync_ray.dev.models"),
    ],
)
def test_other_names_live_in_their_modules_only(name: str, module: str) -> None:
    assert hasattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match=name):
        getattr(lipsync_ray, name)


def test_star_import_gives_the_public_names() -> None:
    namespace: dict = {}
    exec("from lipsync_ray import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(PUBLIC)
