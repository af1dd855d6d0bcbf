"""The agent's one durable write: old or new contents, never half; private from the start."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.files import atomic_file, atomic_write


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_write_replaces_the_file_whole_and_owner_only(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    target.chmod(0o644)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def interrupted() -> None:
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        interrupted()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_exclusive_write_never_replaces_an_existing_file(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    atomic_write(key, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(key, b"second", exclusive=True)
    assert key.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]
