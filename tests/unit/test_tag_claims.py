"""Claims of immutable tags (addons/runstate/tag_claims.py): one holder per (repository, tag) across
the processes of a node, released with the push or with its process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from addons.runstate.tag_claims import claim_path, take


def test_a_held_tag_cannot_be_claimed_again_until_released(tmp_path: Path) -> None:
    first = take(tmp_path, "acme/app", "v1")
    assert first is not None
    assert take(tmp_path, "acme/app", "v1") is None  # same process, another push
    assert take(tmp_path, "acme/app", "v2") is not None  # another tag is free
    assert take(tmp_path, "acme/other", "v1") is not None  # the same tag elsewhere too
    first.release()
    again = take(tmp_path, "acme/app", "v1")
    assert again is not None
    again.release()
    again.release()  # twice is harmless


def test_release_removes_the_file_and_a_leftover_file_is_no_claim(tmp_path: Path) -> None:
    claim = take(tmp_path, "acme/app", "v1")
    assert claim is not None
    claim.release()
    assert not claim_path(tmp_path, "acme/app", "v1").exists()
    claim_path(tmp_path, "acme/app", "v2").touch()  # e.g. left by a crash between steps
    leftover = take(tmp_path, "acme/app", "v2")
    assert leftover is not None
    leftover.release()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from addons.runstate.tag_claims import take
    claim = take(Path(sys.argv[1]), "acme/app", "v1")
    print("held" if claim else "busy", flush=True)
    sys.stdin.readline()  # hold until told, or until killed
    """
)


def test_another_process_holding_the_claim_refuses_it_and_its_death_frees_it(
    tmp_path: Path,
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert take(tmp_path, "acme/app", "v1") is None
    finally:
        holder.kill()
        holder.wait(10)
    # The dead holder's lock went with its descriptors, though its file is still there.
    assert claim_path(tmp_path, "acme/app", "v1").exists()
    claim = take(tmp_path, "acme/app", "v1")
    assert claim is not None
    claim.release()


def test_a_directory_that_cannot_hold_claims_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        take(tmp_path / "missing", "acme/app", "v1")
