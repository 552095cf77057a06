"""Where r1nest finds the files that live beside the package in the repository.

The service image installs the repository itself (`pip install -e /opt/r1nest`), so the
top-level `templates/` and `scripts/` folders sit next to `service/` at run time too.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = REPO_ROOT / "templates"
SCRIPTS_DIR = REPO_ROOT / "scripts"
