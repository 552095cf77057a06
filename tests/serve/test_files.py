"""The data dir's files (r1nest.files): private whole writes, and one error behaviour for readers:
None when absent, a ConfigError naming the file when unreadable or empty, never a traceback."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from r1nest import files
from r1nest.errors import ConfigError


def test_key_readers_name_the_file_they_cannot_read(tmp_path: Path) -> None:
    assert files.read_key_file(tmp_path / files.API_KEY_FILE) is None
    assert files.read_admin_key_file(tmp_path) is None
    for path, read in ((tmp_path / files.API_KEY_FILE, lambda: files.read_key_file(tmp_path / files.API_KEY_FILE)),
                       (tmp_path / files.ADMIN_KEY_FILE, lambda: files.read_admin_key_file(tmp_path))):
        path.mkdir()  # something that is not a readable file (modes do not stop root)
        with pytest.raises(ConfigError, match=f"cannot read the .* file {path}"):
            read()
        path.rmdir()
        path.write_text("\n")
        with pytest.raises(ConfigError, match=f"{path} is empty"):
            read()


def test_writes_name_the_file_they_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match=f"cannot write {locked / files.API_KEY_FILE}"):
        files.write_key_file(locked / files.API_KEY_FILE, "r1n-key")
    with pytest.raises(ConfigError, match=files.SERVE_STATE_FILE):
        files.write_serve_state(locked, {"pid": 1})


def test_private_writes_are_whole_and_owner_only(tmp_path: Path) -> None:
    files.write_serve_state(tmp_path / "data", {"engine_port": 1})
    path = tmp_path / "data" / files.SERVE_STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert files.read_serve_state(tmp_path / "data") == {"engine_port": 1}
    files.remove_serve_state(tmp_path / "data")
    assert files.read_serve_state(tmp_path / "data") == {}
    # the first admin key stored wins; a later one does not replace it
    assert files.create_admin_key_file(tmp_path, "r1nadmin-first") == "r1nadmin-first"
    assert files.create_admin_key_file(tmp_path, "r1nadmin-second") == "r1nadmin-first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [files.ADMIN_KEY_FILE, "data"]  # no temporary files


def test_engine_secret_files_go_into_a_private_folder(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o755)
    files.write_private_files(folder, {"engine_key": "k"})
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "engine_key").stat().st_mode) == 0o600
    assert (folder / "engine_key").read_text() == "k"
