"""fleet.files: the controller's one durable write, and owner-only modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fleet.files import PUBLIC_FILE, atomic_write, private_file


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_the_file_in_one_rename(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    before = target.stat().st_ino
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert target.stat().st_ino != before  # a new file renamed over, never rewritten in place
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.usefixtures("permissive_umask")
def test_new_files_are_owner_only_unless_asked(tmp_path: Path) -> None:
    atomic_write(tmp_path / "secret", b"x")
    atomic_write(tmp_path / "metadata.json", b"{}", mode=PUBLIC_FILE)
    assert mode(tmp_path / "secret") == 0o600
    assert mode(tmp_path / "metadata.json") == 0o644


def test_the_data_and_then_the_folder_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "f", b"data")
    assert synced == ["file", "folder"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken_disk(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_disk)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_exclusive_never_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "admin-token"
    atomic_write(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.usefixtures("permissive_umask")
def test_private_file_creates_or_tightens_without_touching_content(tmp_path: Path) -> None:
    new = private_file(tmp_path / "new.db")
    assert (mode(new), new.read_bytes()) == (0o600, b"")
    loose = tmp_path / "loose.db"
    loose.write_bytes(b"rows")
    loose.chmod(0o644)
    private_file(loose)
    assert (mode(loose), loose.read_bytes()) == (0o600, b"rows")
