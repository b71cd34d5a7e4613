"""Replacing one attribute of an OpenFL object, once, with a way back (the tests restore them)."""
from __future__ import annotations

import inspect
from collections.abc import Callable

_REPLACED: list[tuple[object, str, object]] = []  # (owner, attribute, original), in the order applied


def replace(owner: object, name: str, make: Callable[[object], object]) -> None:
    """Set owner.name to make(original), unless this module already replaced it. (A static method is restored as
    one: what is kept for restore_all is the attribute as the class holds it.)"""
    original = getattr(owner, name)
    if any(o is owner and n == name for o, n, _ in _REPLACED):
        return
    _REPLACED.append((owner, name, inspect.getattr_static(owner, name)))
    setattr(owner, name, make(original))


def restore_all() -> None:
    """Put back every original that replace() swapped out."""
    while _REPLACED:
        owner, name, original = _REPLACED.pop()
        setattr(owner, name, original)
