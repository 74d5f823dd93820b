"""Per-method migrations of a checkpoint's model state: registered by the methods, applied by checkpoints.

``contrast/checkpoint/`` may not import the methods (layers: docs/design.md), yet a method's old
state-dict keys are the method's business. The method registry (``contrast.models.registry.register``)
enters each class's ``migrate_state(state, version)`` here under its ``--model`` name;
``contrast.checkpoint.migrate`` calls it by the name in the checkpoint's config.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

StateMigration = Callable[[Dict[str, Any], int], Dict[str, Any]]
_MIGRATIONS: Dict[str, StateMigration] = {}


def register(name: str, migration: StateMigration) -> None:
    _MIGRATIONS[name] = migration


def unregister(name: str) -> None:
    _MIGRATIONS.pop(name, None)


def migrate_state(name: str, state: Dict[str, Any], version: int) -> Dict[str, Any]:
    """``state`` of a version-``version`` checkpoint of method ``name`` in the next version's keys;
    ``KeyError`` when no method of that name is registered (``contrast.models`` not imported)."""
    if name not in _MIGRATIONS:
        raise KeyError(f"no method {name!r} is registered (import contrast.models; registered: "
                       f"{', '.join(_MIGRATIONS) or 'none'})")
    return _MIGRATIONS[name](state, version)
