"""What every benchmark does with its result: print it as JSON and, with ``--out``, write it there too."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: Path | None, default: Callable[[Any], Any] | None = None) -> None:
    text = json.dumps(result, indent=2, default=default)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
