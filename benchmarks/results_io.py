"""Writing a benchmark's JSON result (relative paths in what it prints)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict


def write_json(path: str, payload: Dict[str, Any], note: str = "") -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {os.path.relpath(path)}{note}", flush=True)
