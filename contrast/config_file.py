"""``--config FILE``: a YAML or JSON file sets every flag of a parser, flags given override it.

Part of the command-line layer (with :mod:`contrast.option`). The file is a run's own
``config.json`` (either version, see :mod:`contrast.runconfig`), or a hand-written recipe in the
same grouped form (``model: PIC`` under ``method:``, ``epochs: 200`` under ``loop:``) or flat
(``model: PIC`` at the top). Its keys are flag names with ``_`` (``base_learning_rate``); its values
become the parser's defaults, so any flag on the command line overrides them. A key that is no
flag of the parser is refused in one line naming the file and the key; the ``run`` section (facts
such as the effective lr) is not read. :func:`resolve_from_config` fills the flags an evaluation
left unset from a checkpoint's config.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence

from contrast.runconfig import FACTS, RUN_FACTS, flat_config, is_grouped, load_run_config, read_file

#: Keys not read: ``small_stem`` (older config.json files; now ``--stem``), ``config`` (the file itself),
#: ``local_rank`` (set per process by the launcher, never the recorded rank's).
IGNORED = frozenset({"small_stem", "config", "local_rank"})


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=str, default=None, metavar="FILE",
                   help="(new) YAML or JSON file of settings (a recipe, or a run's config.json): it sets every "
                        "value it names, flags given on the command line override it; `--config OUT/config.json "
                        "--output-dir OUT2` repeats a run")


def parse_with_config(p: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """``p.parse_args(argv)`` over the values of its ``--config FILE``, if given."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            values = config_defaults(p, known.config)
        except ValueError as e:
            p.error(str(e))
        p.set_defaults(**values)
    return p.parse_args(argv)


def config_defaults(p: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """The flag values file ``path`` sets for parser ``p``, converted and checked; ``ValueError``
    names the file and the offending key."""
    raw = read_file(path)
    grouped = is_grouped(raw)
    try:
        config = load_run_config(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    actions = {}
    for action in p._actions:
        if action.dest != argparse.SUPPRESS and action.option_strings:
            actions.setdefault(action.dest, action)
    values: Dict[str, Any] = {}
    for section, entries in config.items():
        if section == FACTS or not isinstance(entries, dict):
            continue
        for key, value in entries.items():
            if key in IGNORED:
                continue
            action = actions.get(key)
            if action is None:
                name = f"{section}.{key}" if grouped else key
                raise ValueError(f"{path}: unknown key {name!r} (no flag --{key.replace('_', '-')} of "
                                 f"{p.prog})")
            values[key] = _convert(path, action, key, value)
    if not grouped:   # a version-1 config.json: its facts are not settings
        for key in RUN_FACTS:
            values.pop(key, None)
    return values


def _convert(path: str, action: argparse.Action, key: str, value: Any) -> Any:
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0)
    items: List[Any] = list(value) if many and isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if item is not None and action.type is not None and not isinstance(item, bool):
            try:
                item = action.type(item)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: {key}: {item!r} is not a valid value ({e})") from None
        if item is not None and action.choices is not None and item not in action.choices:
            raise ValueError(f"{path}: {key}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(item)
    if not many:
        return out[0]
    return tuple(out) if isinstance(action.default, tuple) else out   # as the flag's own default


def resolve_from_config(args: argparse.Namespace, config: Dict[str, Any],
                        names: Sequence[str] = ("arch", "stem", "image_size", "val_crop_fraction")) -> List[str]:
    """Fill the flags in ``names`` the user left unset (None) from a checkpoint's ``config`` (either
    form, read through :func:`~contrast.runconfig.flat_config`; ``stem`` also from older configs'
    ``small_stem``); returns the names taken from it."""
    from contrast.models import stem_of
    config = flat_config(config)
    fallback = {"image_size": 224, "val_crop_fraction": 0.875, "stem": "imagenet"}
    taken = []
    for name in names:
        if getattr(args, name, None) is not None:
            continue
        value = stem_of(config) if name == "stem" else config.get(name)
        if value is None:
            value = fallback.get(name)
        else:
            taken.append(name)
        setattr(args, name, value)
    return taken
