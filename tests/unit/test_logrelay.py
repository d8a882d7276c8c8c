"""The operator log's lines (logrelay.classify, operator_line): each program's format read
for its level, its own timestamp dropped, supervisord's mechanics said in operator terms."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time

import pytest

from addons.cli.logrelay import LogRelay, OperatorText, classify, operator_line


@pytest.mark.parametrize(
    ("source", "line", "expected"),
    [
        (
            "supervisord",
            "2026-12-07 14:17:33,484 WARN stopped: backend (terminated by SIGTERM)",
            ("debug", "the backend stopped (terminated by SIGTERM)"),
        ),
        (
            "supervisord",
            "2026-12-07 14:17:27,215 CRIT Supervisor is running as root.  Privileges were not "
            "dropped because no user is specified in the config file.",
            (
                "debug",
                "Supervisor is running as root.  Privileges were not dropped because no "
                "user is specified in the config file.",
            ),
        ),
        (
            "supervisord",
            "2026-12-07 14:17:30,001 WARN exited: gateway-1 (terminated by SIGKILL; not expected)",
            (
                "warning",
                "gateway worker 1 exited unexpectedly (terminated by SIGKILL); restarting it",
            ),
        ),
        (
            "supervisord",
            "2026-12-07 14:17:40,001 INFO gave up: backend entered FATAL state, too many start "
            "retries too quickly",
            ("error", "the backend could not start (it failed again at each retry)"),
        ),
        (
            "backend",
            'time="2026-12-07T14:17:27.1Z" level=error msg="response completed with error" x=1',
            ("error", 'level=error msg="response completed with error" x=1'),
        ),
        (
            "backend",
            '{"level":"warn","time":"2026-12-07T14:17:27Z","message":"slow","caller":"a.go:1"}',
            ("warning", 'slow {"caller": "a.go:1"}'),
        ),
        (
            "gateway-0",
            "WARNING access log: 3 lines dropped",
            ("warning", "access log: 3 lines dropped"),
        ),
        ("admin", "ERROR admin endpoint error", ("error", "admin endpoint error")),
        (
            "gateway-0",
            "Traceback (most recent call last):",
            ("error", "Traceback (most recent call last):"),
        ),
        (
            "mesh",
            "tabbify-registry mesh: coordinator unreachable",
            ("warning", "coordinator unreachable"),
        ),
        ("mesh", "mesh: peer set updated (3 peers)", ("info", "mesh: peer set updated (3 peers)")),
        (
            "gc",
            '{"gc": "failed: backend down"}',
            ("error", "garbage collection: failed: backend down"),
        ),
    ],
)
def test_classify(source, line, expected):
    level, message = classify(source, line)
    assert (level, message) == expected
    assert not re.search(r"\d\d:\d\d:\d\d", message)  # the operator line has the time


def test_operator_lines_are_json_objects_with_time_level_source_and_message():
    entry = json.loads(operator_line("run", "listening on http://127.0.0.1:5000", "info"))
    assert set(entry) == {"time", "level", "source", "message"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    readable = operator_line("run", "stopped", "warning", readable=True).decode()
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING run: stopped\n", readable)


def test_lines_below_the_level_are_not_relayed(tmp_path):
    out, err = io.BytesIO(), io.BytesIO()
    relay = LogRelay(tmp_path, out, err, level="warning")
    relay.log("info", "summary")
    relay.log("debug", "mechanics")
    relay.log("error", "backend could not start")
    deadline = time.monotonic() + 5
    while b"could not start" not in err.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert [e["message"] for e in lines] == ["backend could not start"]


def test_a_tracebacks_lines_keep_its_level(tmp_path):
    out, err = io.BytesIO(), io.BytesIO()
    relay = LogRelay(tmp_path, out, err, level="warning")
    read, write = os.pipe()
    relay.source(read, "gateway-0", "stderr")
    relay.start()
    os.write(write, b"ERROR addon failed\nTraceback (most recent call last):\n")
    os.write(write, b'  File "x.py", line 1, in <module>\n    raise ValueError\nValueError: x\n')
    deadline = time.monotonic() + 5
    while err.getvalue().count(b"\n") < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.close(write)
    lines = [json.loads(line) for line in err.getvalue().splitlines()]
    assert [e["level"] for e in lines] == ["error"] * 5
    assert lines[3]["message"] == "    raise ValueError"


def test_what_run_prints_before_the_relay_runs_becomes_operator_lines():
    out = io.BytesIO()
    said = OperatorText("mesh", out, "info", readable=False)
    with contextlib.redirect_stderr(said):
        print("tabbify-registry mesh: coordinator unreachable; coming up on", file=sys.stderr)
        print("mesh: skipped peer #1", file=sys.stderr)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["level"], e["source"]) for e in lines] == [("warning", "mesh"), ("info", "mesh")]
    assert lines[0]["message"] == "coordinator unreachable; coming up on"
