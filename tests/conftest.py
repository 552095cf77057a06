"""Shared pytest setup. Fixtures that belong to one area live in that folder's conftest.py."""

import os

# Tests must never pick up a developer's own settings or state.
for _name in [n for n in os.environ if n.upper().startswith("R1NEST_")]:
    del os.environ[_name]
