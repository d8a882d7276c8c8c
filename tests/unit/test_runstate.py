"""addons/runstate.py: the one writer and the one watcher of the run-state files."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from addons import runstate


def test_readers_see_the_old_file_or_the_new_one_never_part_of_one(tmp_path: Path) -> None:
    path = tmp_path / runstate.worker_state(0)
    versions = [bytes([65 + i]) * (1 << 16) * (i + 1) for i in range(4)]  # 64 KiB .. 256 KiB
    runstate.write(path, versions[0])
    done, torn, reads = threading.Event(), [], [0]

    def reader() -> None:
        while not done.is_set():
            body = path.read_bytes()
            reads[0] += 1
            if body not in versions:
                torn.append(len(body))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(300):
        runstate.write(path, versions[i % len(versions)])
    done.set()
    for t in threads:
        t.join()
    assert reads[0] > 0 and torn == []
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_a_new_file_is_the_registry_users_alone_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        runstate.write_json(tmp_path / runstate.FREEZE, {"until": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / runstate.FREEZE).stat().st_mode) == 0o600


def test_a_rewrite_keeps_the_files_mode_unless_told(tmp_path: Path) -> None:
    path = tmp_path / runstate.CAPTURE
    runstate.write_json(path, {"until": 0})
    path.chmod(0o640)  # an operator's
    runstate.write_json(path, {"until": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and b'"until": 1' in path.read_bytes()
    runstate.write(path, b"{}", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_watcher_sees_each_change_once(tmp_path: Path) -> None:
    path = tmp_path / runstate.SIGNATURES_GENERATION
    watch = runstate.Watch(path)
    assert not watch.changed()  # absent, and was
    runstate.write(path, b"0123456789abcdef")
    assert watch.changed() and not watch.changed()
    runstate.write(path, b"fedcba9876543210")  # same size, same second: a new inode
    assert watch.changed() and not watch.changed()
    path.unlink()
    assert watch.changed() and not watch.changed()
    assert not runstate.Watch(None).changed()


def test_a_followed_file_is_read_again_only_when_it_changed(tmp_path: Path) -> None:
    path, reads = tmp_path / runstate.CAPTURE, []

    def read(p: Path) -> bytes:
        reads.append(p)
        return p.read_bytes()

    followed = runstate.Followed(read)
    assert followed.current(path) is None and reads == []  # no file: nothing read
    runstate.write(path, b"one")
    assert followed.current(path) == b"one" and followed.current(path) == b"one"
    assert len(reads) == 1
    runstate.write(path, b"two")
    assert followed.current(path) == b"two" and len(reads) == 2
    path.unlink()
    assert followed.current(path) is None and followed.current(None) is None
