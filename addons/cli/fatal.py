"""Supervisord event listener: a program that cannot start stops the whole container.

Supervisord itself exits 0 when told to stop, so the listener leaves a marker naming the
program and `run` turns it into a non-zero exit status (PID-1 semantics).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def main() -> None:
    marker = Path(sys.argv[1])
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        header = dict(token.split(":", 1) for token in sys.stdin.readline().split())
        payload = sys.stdin.read(int(header["len"]))
        fields = dict(token.split(":", 1) for token in payload.split("\n", 1)[0].split())
        marker.write_text(fields.get("processname", "?") + "\n")
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()
        os.kill(os.getppid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
