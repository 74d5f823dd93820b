"""Write each registered method's recipe as a readable YAML file: ``scripts/configs/<Method>.yaml``.

The method class stays the one source of the recipe: the files are generated from what
``main_pretrain.py --model X`` resolves to (the shared recipe flags and the method's own flags), in
the grouped form of ``config.json``, and ``tests/test_run_config.py`` checks they are up to date.
Use one with ``main_pretrain.py --config scripts/configs/MoCov2.yaml --data-dir ... --epochs 200``
(flags given override the file). A recipe whose warm-up follows the epochs (``--epochs // 40``)
leaves ``warmup_epoch`` out, so the rule still applies.

    python tools/write_recipes.py            # (re)write the files
    python tools/write_recipes.py --check    # exit 1 naming a file that is not up to date
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from contrast.models import METHODS  # noqa: E402
from contrast.models.recipe import FLAG_FIELDS  # noqa: E402
from contrast.option import new_parser, resolve_pretrain  # noqa: E402
from contrast.runconfig import SECTION_OF, SECTIONS  # noqa: E402

OUT_DIR = os.path.join(ROOT, "scripts", "configs")


def recipe_settings(name: str) -> Dict[str, Dict[str, object]]:
    """The grouped settings ``--model name`` resolves to: the model, every recipe flag, the method's flags."""
    cls = METHODS[name]
    args, _ = resolve_pretrain(name)
    keys = ["model", *FLAG_FIELDS, *(f.dest for f in cls.flags)]
    if cls.recipe.warmup_divisor:
        keys.remove("warmup_epoch")
    grouped: Dict[str, Dict[str, object]] = {}
    for key in keys:
        value = getattr(args, key)
        grouped.setdefault(SECTION_OF.get(key, "method"), {})[key] = list(value) if isinstance(value, tuple) else value
    return {s: grouped[s] for s in SECTIONS if s in grouped}


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists on one line."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def recipe_yaml(name: str) -> str:
    cls = METHODS[name]
    head = (f"# --model {name}: the recipe of {cls.__module__.replace('.', '/')}.py, written by "
            f"tools/write_recipes.py (do not edit).\n# main_pretrain.py --config scripts/configs/{name}.yaml "
            f"[flags]: flags given override these values.\n")
    if cls.recipe.warmup_divisor:
        head += f"# warmup_epoch: --epochs // {cls.recipe.warmup_divisor} (the recipe's rule)\n"
    return head + yaml.dump(recipe_settings(name), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def main(argv: Optional[List[str]] = None) -> int:
    p = new_parser("write_recipes.py", __doc__)
    p.add_argument("--out-dir", default=OUT_DIR, help="where the <Method>.yaml files go")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is missing or differs")
    args = p.parse_args(argv)
    stale = []
    for name in METHODS:
        path = os.path.join(args.out_dir, f"{name}.yaml")
        text = recipe_yaml(name)
        current = open(path).read() if os.path.isfile(path) else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            os.makedirs(args.out_dir, exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {os.path.relpath(path, ROOT)}")
    if stale:
        print(f"{stale[0]}: not up to date with the method's recipe; run python tools/write_recipes.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
