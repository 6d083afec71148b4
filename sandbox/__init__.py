"""Emulators and the local runtime. Never deployed; the clinicsync package comes from the layer folder,
and the IDENT connector (which runs at clinics, not in the stack) from ``connector/``."""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(_ROOT / "layers" / "shared"), str(_ROOT / "connector"), str(_ROOT / "cli")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
