"""The public surface: one curated `__all__`, sorted, every name documented."""

from __future__ import annotations

import inspect

import trio_stream


def test_all_is_sorted_and_complete() -> None:
    assert trio_stream.__all__ == sorted(trio_stream.__all__)
    public = {name for name in vars(trio_stream) if not name.startswith("_")}
    public -= {"annotations", "backends", "testing"}
    assert set(trio_stream.__all__) == public


def test_every_public_name_has_a_docstring() -> None:
    for name in trio_stream.__all__:
        obj = getattr(trio_stream, name)
        assert inspect.getdoc(obj), f"{name} has no docstring"
