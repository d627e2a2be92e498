"""Structured logs: one JSON object per line with the session, device, task and job ids, and
never a secret — checked on the whole log of a full run of a real ``dmengine serve`` at debug
level (tests/obs_flow.py), and the formatter and redaction on their own."""
from __future__ import annotations

import io
import json
import logging
import re

import pytest
import uvloop

from dmengine import logs
from dmengine.errors import ConfigError

from tests.obs_flow import full_run


def test_a_full_run_logs_json_with_ids_and_no_secret(tmp_path):
    run = uvloop.run(full_run(tmp_path))
    assert run.returncode == 0, run.log[-3000:]
    lines = run.log.splitlines()
    assert len(lines) > 20, run.log
    events = []
    for i, line in enumerate(lines):
        try:
            ev = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {i + 1} is not JSON: {line!r}") from None
        assert isinstance(ev, dict) and {"time", "level", "logger", "msg"} <= set(ev), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ev["time"]), line
        events.append(ev)
    # no secret of the run anywhere in the log (each distinctive enough not to occur by chance)
    for what, secret in run.secrets.items():
        assert len(secret) >= 6, what
        assert secret not in run.log, f"the log contains the {what}"
    # ids: every task move names its task, device and (for the job's tasks) job
    moves = [e for e in events if e["logger"] == "dmengine.tasks" and
             e["msg"].startswith("task moved to")]
    by_task = {e["task"] for e in moves}
    assert {run.task_id, *run.job_task_ids} <= by_task, by_task
    for e in moves:
        assert e["device"] in run.dev_ids, e
        if e["task"] in run.job_task_ids:
            assert e["job"] == run.job_id, e
        else:
            assert "job" not in e, e
    # a device's session: identified, its task moves inside it and its end carry one
    # session label (a hash: never the RespURI token) and the device
    ident = [e for e in events if e["msg"] == "device identified in an authenticated session"]
    assert {e["device"] for e in ident} >= set(run.dev_ids), ident
    for e in ident:
        assert re.fullmatch(r"[0-9a-f]{12}", e["session"]), e
    in_session = [e for e in moves if "session" in e]
    assert in_session, "no task move logged inside a DM session"
    sessions_of = {e["session"]: e["device"] for e in ident}
    for e in in_session:
        assert sessions_of.get(e["session"]) == e["device"], e
    assert any(e["msg"].startswith("session closed") or e["msg"].startswith("task moved")
               for e in events if e.get("session"))
    # the impostor's failed authentication names the device it claimed to be
    failed = [e for e in events if e["msg"].startswith("authentication failed")]
    assert failed and all(e["device"] == run.bad_dev_id and re.fullmatch(r"[0-9a-f]{12}",
                                                                          e["session"])
                          for e in failed), failed
    # the job's creation and the webhook deliveries name the job / task
    assert any(e.get("job") == run.job_id and e["msg"].startswith("job created")
               for e in events)
    delivered = [e for e in events if e["logger"] == "dmengine.webhooks"
                 and "delivered" in e["msg"]]
    assert {e.get("task") for e in delivered} >= {run.task_id}, delivered


# --- the parts on their own ---------------------------------------------------------------------


@pytest.mark.parametrize("text,hidden", [
    ("DmAccount(client_name='d1', client_password='s3cr3t!', server_nonce=b'AAEC')",
     ["s3cr3t!", "AAEC"]),
    ("kannel http://sms:13013/cgi-bin/sendsms?user=u&password=hunter22&to=1", ["hunter22"]),
    ('{"apiKey": "k-123456789", "webhookSecret":"abc def"}', ["k-123456789", "abc def"]),
    ("Authorization: Basic dXNlcjpwYXNz", ["dXNlcjpwYXNz"]),
    ("X-API-Key: Zm9vYmFyYmF6", ["Zm9vYmFyYmF6"]),
    ("client_key=0011ff server_key: 'aa'", ["0011ff", "'aa'"]),
    ("the password is hunter2", ["hunter2"]),
])
def test_redact_blanks_values_of_secret_keys(text, hidden):
    out = logs.redact(text)
    for h in hidden:
        assert h not in out, out
    assert "***" in out


def test_redact_leaves_ordinary_text():
    for text in ("scheduler pass failed", "task t1 moved to SUCCEEDED: done", "passes=3",
                 "key_id k1 revoked", "session 0a1b2c3d4e5f failed: timeout"):
        assert logs.redact(text) == text


def capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    buf = io.StringIO()
    handler = logs.setup(fmt, "debug", stream=buf)
    log = logging.getLogger("dmengine.test_logs")
    return log, buf


@pytest.fixture(autouse=True)
def _restore_root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_bound_ids_and_extra_wins():
    log, buf = capture("json")
    logs.bind(session="TOKEN-abcdef", device="IMEI:1")
    log.info("one")
    with logs.bound(task="t1", job="j1"):
        log.info("two", extra=logs.ids(task="t2"))
    log.info("three\nwith a newline")
    try:
        raise ValueError("password=oops")
    except ValueError:
        log.exception("four")
    logs.bind()
    log.info("five")
    out = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(out) == 5
    label = logs.session_label("TOKEN-abcdef")
    assert out[0]["session"] == label and "TOKEN" not in buf.getvalue()
    assert out[0]["device"] == "IMEI:1" and "task" not in out[0]
    assert (out[1]["task"], out[1]["job"]) == ("t2", "j1")
    assert "task" not in out[2] and out[2]["msg"] == "three\nwith a newline"
    assert "ValueError" in out[3]["exc"] and "oops" not in out[3]["exc"]
    assert not {"session", "device", "task", "job"} & set(out[4])


def test_text_format_appends_the_ids():
    log, buf = capture("text")
    with logs.bound(task="t9"):
        log.warning("moved")
    line = buf.getvalue().strip()
    assert line.endswith("WARNING dmengine.test_logs: moved [task=t9]"), line


def test_setup_refuses_unknown_format_and_level(monkeypatch):
    with pytest.raises(ConfigError) as exc:
        logs.setup("xml", "info")
    assert exc.value.key == "log_format"
    with pytest.raises(ConfigError) as exc:
        logs.setup("json", "loud")
    assert exc.value.key == "log_level"
    monkeypatch.setenv("DMENGINE_LOG_FORMAT", "json")
    buf = io.StringIO()
    logs.setup(None, None, stream=buf)
    logging.getLogger("dmengine.x").info("hi")
    assert json.loads(buf.getvalue())["msg"] == "hi"


def test_a_command_refused_by_an_ended_session_does_not_name_its_key() -> None:
    """The session key is the RespURI token: an error text must never carry it (issue 17)."""
    from dmengine._session import DmSession, SessionConfig
    from dmengine.errors import CommandRejected
    from dmengine.message import Command, Item

    key = "k3y-" + "s" * 20
    s = DmSession(SessionConfig(server_id="dmengine", server_uri="https://dm.example.com/dm"),
                  session_key=key, resp_uri=None, now=0.0)
    s.close("test")
    try:
        s.queue("h", Command(name="Get", items=[Item(target="./DevInfo/Mod")]))
    except CommandRejected as exc:
        assert key not in str(exc) and "ended" in str(exc)
    else:
        raise AssertionError("an ended session took a command")
