"""--log-format json as a process sees it: every line on stderr one JSON object, library warnings and
uncaught tracebacks included (run in a child process, since configuring logging is process-wide)."""
from __future__ import annotations

import json
import subprocess
import sys

CHILD = """
import logging, threading, warnings
from tokenmill.engine.log_setup import LogSettings
LogSettings(json=True).configure("engine")
logging.getLogger("tokenmill.x").info("hello %s", "there", extra={"request_id": "r1", "tokens": [1, 2]})
warnings.warn("careful")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("tokenmill.x").exception("caught")
thread = threading.Thread(target=lambda: {}["missing"], name="worker")
thread.start(); thread.join()
logging.getLogger("tokenmill.x").debug("not at info level")
raise RuntimeError("nothing caught this")
"""


def test_every_line_a_json_process_writes_is_one_json_object():
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert child.returncode == 1
    lines = [json.loads(line) for line in child.stderr.splitlines()]
    assert [line["level"] for line in lines] == ["INFO", "WARNING", "ERROR", "CRITICAL", "CRITICAL"]
    hello, warning, caught, in_thread, uncaught = lines
    assert hello["message"] == "hello there" and hello["process"] == "engine" and hello["logger"] == "tokenmill.x"
    assert (hello["request_id"], hello["tokens"]) == ("r1", [1, 2]) and hello["time"].endswith("Z")
    assert "careful" in warning["message"]
    assert "ZeroDivisionError" in caught["exception"]
    assert "worker" in in_thread["message"] and "KeyError" in in_thread["exception"]
    assert "RuntimeError: nothing caught this" in uncaught["exception"]
    assert child.stdout == ""
