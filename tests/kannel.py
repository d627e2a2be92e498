"""A real Kannel (Debian's bearerbox + smsbox, kannel-extras' fakesmsc) for tests.

Follows ../shared/REAL-PARTS.md: every socket on 127.0.0.1 on free ports, config written to
a temporary directory, start order bearerbox → fakesmsc → smsbox with a readiness check after
each (admin ``status.txt`` answers; ``FAKE:<port> (online``; sendsms answers and ``smsbox:``
is listed), and stop by PID: SIGTERM smsbox, then bearerbox, then fakesmsc if still alive,
SIGKILL after a timeout.  Never a fixed sleep: every wait polls with a deadline.

What arrived at the fake SMSC is read from two places: fakesmsc's stderr lines
(``Got message N: <from to udh %..  data %..>``) and bearerbox's access log
(``Sent SMS [SMSC:FAKE] ... [to:N] [flags:..] [msg:LEN:HEX] [udh:LEN:HEX]``).

Usage in a test module::

    from kannel import kannel  # noqa: F401  (the fixture)

    def test_x(kannel):
        ... send to kannel.sendsms_base ...
        sms = kannel.wait_for_sms(to="4915112345678")
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest

BEARERBOX = os.environ.get("KANNEL_BEARERBOX", "/usr/sbin/bearerbox")
SMSBOX = os.environ.get("KANNEL_SMSBOX", "/usr/sbin/smsbox")
FAKESMSC = os.environ.get("KANNEL_FAKESMSC", "/usr/lib/kannel/test/fakesmsc")

START_TIMEOUT = 20.0      # generous: two shared cores; normally all three are up in ~0.3 s
STOP_TIMEOUT = 5.0        # per process, before SIGKILL
USERNAME = "tester"
PASSWORD = "testpw"
STATUS_PASSWORD = "statuspw"
SMSC_ID = "FAKE"

_FAKESMSC_LINE = re.compile(r"Got message (\d+): <(.*)>\s*$")
_ACCESS_LINE = re.compile(r"^(?P<when>\S+ \S+) Sent SMS \[SMSC:(?P<smsc>[^\]]*)\].*?"
                          r"\[from:(?P<sender>[^\]]*)\] \[to:(?P<to>[^\]]*)\] "
                          r"\[flags:(?P<flags>[^\]]*)\] "
                          r"\[msg:(?P<msglen>\d+):(?P<msg>[0-9A-Fa-f]*)\] "
                          r"\[udh:(?P<udhlen>\d+):(?P<udh>[0-9A-Fa-f]*)\]")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test process dies without a teardown
    (kill -9, a crash), so no box outlives it.  Linux only; elsewhere a no-op."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class KannelError(AssertionError):
    """The harness could not start, talk to or stop Kannel (fails the test, never skips)."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound to port 0 together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _unquote(field: str) -> bytes:
    # Kannel writes a space as '+', a literal '+' as %2B (REAL-PARTS.md)
    return unquote_to_bytes(field.replace("+", " "))


@dataclass(frozen=True)
class FakeSmscMessage:
    """One line of fakesmsc output, decoded."""

    number: int
    sender: str
    receiver: str
    udh: bytes | None
    data: bytes
    kind: str          # "data" (binary) or "text"
    line: str


@dataclass(frozen=True)
class AccessLogEntry:
    """One ``Sent SMS`` line of bearerbox's access log."""

    smsc: str
    sender: str
    receiver: str
    flags: tuple[int, ...]     # mclass:coding:mwi:compress:dlr_mask
    msg: bytes
    udh: bytes
    line: str

    @property
    def coding(self) -> int:
        return self.flags[1]


def parse_fakesmsc_line(line: str) -> FakeSmscMessage | None:
    m = _FAKESMSC_LINE.search(line)
    if not m:
        return None
    fields = m.group(2).split(" ")
    if len(fields) < 4:
        raise KannelError(f"fakesmsc line not understood: {line!r}")
    sender, receiver = fields[0], fields[1]
    udh = None
    rest = fields[2:]
    if rest[0] == "udh":
        udh = _unquote(rest[1])
        rest = rest[2:]
    if len(rest) != 2 or rest[0] not in ("data", "text"):
        raise KannelError(f"fakesmsc line not understood: {line!r}")
    kind, value = rest
    return FakeSmscMessage(number=int(m.group(1)), sender=sender, receiver=receiver, udh=udh,
                           data=_unquote(value), kind=kind, line=line)


def parse_access_line(line: str) -> AccessLogEntry | None:
    m = _ACCESS_LINE.search(line)
    if not m:
        return None
    msg, udh = bytes.fromhex(m["msg"]), bytes.fromhex(m["udh"])
    if len(msg) != int(m["msglen"]) or len(udh) != int(m["udhlen"]):
        raise KannelError(f"access-log lengths disagree with the hex: {line!r}")
    return AccessLogEntry(smsc=m["smsc"], sender=m["sender"], receiver=m["to"],
                          flags=tuple(int(x) for x in m["flags"].split(":")), msg=msg, udh=udh,
                          line=line)


class Kannel:
    """bearerbox + fakesmsc + smsbox as child processes; ``start()``/``stop()`` or a context."""

    def __init__(self, workdir: Path | None = None, *, with_smsc: bool = True) -> None:
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="dmengine-kannel-"))
        self.with_smsc = with_smsc
        self.admin_port, self.smsbox_port, self.smsc_port, self.sendsms_port = free_ports(4)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[object] = []
        self.conf = self.dir / "kannel.conf"
        self.access_log = self.dir / "bb-access.log"
        self.fakesmsc_err = self.dir / "fakesmsc.err"

    # --- addresses ---------------------------------------------------------------------
    @property
    def sendsms_base(self) -> str:
        return f"http://127.0.0.1:{self.sendsms_port}"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/status.txt?password={STATUS_PASSWORD}"

    username = USERNAME
    password = PASSWORD

    # --- config ------------------------------------------------------------------------
    def write_config(self) -> None:
        d = self.dir
        self.conf.write_text(f"""\
group = core
admin-port = {self.admin_port}
admin-interface = 127.0.0.1
admin-password = adminpw
status-password = {STATUS_PASSWORD}
admin-allow-ip = "127.0.0.1"
smsbox-port = {self.smsbox_port}
smsbox-interface = 127.0.0.1
box-allow-ip = "127.0.0.1"
log-file = "{d}/bearerbox.log"
access-log = "{self.access_log}"
dlr-storage = internal

group = smsc
smsc = fake
smsc-id = {SMSC_ID}
port = {self.smsc_port}
our-host = 127.0.0.1
connect-allow-ip = "127.0.0.1"

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {self.smsbox_port}
sendsms-port = {self.sendsms_port}
sendsms-interface = 127.0.0.1
log-file = "{d}/smsbox.log"

group = sendsms-user
username = {USERNAME}
password = {PASSWORD}
max-messages = 1
concatenation = false
""")

    # --- processes -----------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], stderr_path: Path | None = None) -> None:
        out = open(self.dir / f"{name}.out", "wb")
        err = open(stderr_path, "wb") if stderr_path else subprocess.STDOUT
        self._files.append(out)
        if stderr_path:
            self._files.append(err)
        # a plain exec, so the PID is the box's own (no shell in between)
        self.procs[name] = subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=err,
                                            preexec_fn=_die_with_parent)

    def _tail(self, name: str, n: int = 30) -> str:
        chunks = []
        for p in (self.dir / f"{name}.out", self.dir / f"{name}.log",
                  self.fakesmsc_err if name == "fakesmsc" else None):
            if p is not None and p.exists():
                lines = p.read_text(errors="replace").splitlines()[-n:]
                chunks.append(f"--- {p.name}:\n" + "\n".join(lines))
        return "\n".join(chunks)

    def _wait(self, what: str, check, procs: tuple[str, ...],
              timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            for name in procs:
                rc = self.procs[name].poll()
                if rc is not None:
                    raise KannelError(f"{name} exited with {rc} while waiting for {what}\n"
                                      + self._tail(name))
            if check():
                return
            if time.monotonic() > deadline:
                raise KannelError(f"timed out after {timeout}s waiting for {what}\n"
                                  + "\n".join(self._tail(n) for n in procs))
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def status(self) -> str | None:
        try:
            with urllib.request.urlopen(self.status_url, timeout=2) as r:
                return r.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return None

    def _smsc_online(self) -> bool:
        s = self.status()
        return s is not None and f"{SMSC_ID}:{self.smsc_port} (online" in s

    def _sendsms_ready(self) -> bool:
        s = self.status()
        if s is None or "smsbox:" not in s:
            return False
        try:
            with urllib.request.urlopen(f"{self.sendsms_base}/cgi-bin/sendsms", timeout=2) as r:
                r.read()
            return True
        except urllib.error.HTTPError:
            return True           # it answered (403/400 without credentials): it is up
        except (urllib.error.URLError, OSError):
            return False

    def start(self, *, port_attempts: int = 3) -> Kannel:
        """Start all three; if a port was taken meanwhile (free ports are only free when
        chosen), stop everything and try again on fresh ports."""
        for exe in (BEARERBOX, SMSBOX, FAKESMSC):
            if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
                raise KannelError(f"{exe} is missing: run `make deps` (it installs the Debian "
                                  f"packages kannel and kannel-extras)")
        for attempt in range(1, port_attempts + 1):
            try:
                return self._start()
            except KannelError as exc:
                if "Address already in use" not in str(exc) or attempt == port_attempts:
                    raise
                self.procs.clear()
                self.admin_port, self.smsbox_port, self.smsc_port, self.sendsms_port = free_ports(4)
        raise AssertionError("unreachable")

    def _own_status(self) -> bool:
        # our bearerbox, not another test's on a recycled port: the status names our SMSC port
        s = self.status()
        return s is not None and f"{SMSC_ID}:{self.smsc_port} (" in s

    def _start(self) -> Kannel:
        self.write_config()
        try:
            self._spawn("bearerbox", [BEARERBOX, "-v", "1", str(self.conf)])
            self._wait("bearerbox admin status.txt", self._own_status, ("bearerbox",))
            if self.with_smsc:
                self.start_fakesmsc()
            self._spawn("smsbox", [SMSBOX, "-v", "1", str(self.conf)])
            self._wait("smsbox sendsms port", self._sendsms_ready, ("bearerbox", "smsbox"))
        except BaseException:
            self.stop()
            raise
        return self

    def start_fakesmsc(self) -> None:
        """Start (or restart) the fake SMSC and wait until bearerbox shows it online."""
        old = self.procs.get("fakesmsc")
        if old is not None and old.poll() is None:
            raise KannelError("fakesmsc already running")
        # -m 0: receive only; the message argument is required but never sent
        self._spawn("fakesmsc", [FAKESMSC, "-H", "127.0.0.1", "-r", str(self.smsc_port),
                                 "-m", "0", "0 0 text unused"], stderr_path=self.fakesmsc_err)
        self._wait(f"{SMSC_ID}:{self.smsc_port} online", self._smsc_online,
                   ("bearerbox", "fakesmsc"))

    def stop_fakesmsc(self) -> None:
        """Stop the fake SMSC and wait until bearerbox no longer shows it online."""
        self._stop_one("fakesmsc")
        self._wait("fake SMSC offline", lambda: not self._smsc_online(), ("bearerbox",))

    def _stop_one(self, name: str) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM smsbox, then bearerbox; fakesmsc exits when bearerbox closes its socket."""
        errors = []
        for name in ("smsbox", "bearerbox"):
            try:
                self._stop_one(name)
            except Exception as exc:   # keep going: every child must be stopped
                errors.append(f"{name}: {exc}")
        p = self.procs.get("fakesmsc")
        if p is not None and p.poll() is None:
            try:
                p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    self._stop_one("fakesmsc")
                except Exception as exc:
                    errors.append(f"fakesmsc: {exc}")
        for f in self._files:
            f.close()  # type: ignore[attr-defined]
        self._files.clear()
        if errors:
            raise KannelError("could not stop Kannel cleanly: " + "; ".join(errors))

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Kannel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()

    # --- what arrived ----------------------------------------------------------------------
    def fakesmsc_messages(self) -> list[FakeSmscMessage]:
        if not self.fakesmsc_err.exists():
            return []
        out = []
        for line in self.fakesmsc_err.read_text(errors="replace").splitlines():
            m = parse_fakesmsc_line(line)
            if m is not None:
                out.append(m)
        return out

    def access_log_entries(self) -> list[AccessLogEntry]:
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            e = parse_access_line(line)
            if e is not None:
                out.append(e)
        return out

    def wait_for_sms(self, *, to: str, count: int = 1, timeout: float = START_TIMEOUT
                     ) -> list[tuple[FakeSmscMessage, AccessLogEntry]]:
        """Wait until ``count`` messages to ``to`` show up in both fakesmsc and the access log;
        returns them paired in order."""
        found: list[tuple[FakeSmscMessage, AccessLogEntry]] = []

        def check() -> bool:
            fs = [m for m in self.fakesmsc_messages() if m.receiver == to]
            al = [e for e in self.access_log_entries() if e.receiver == to]
            if len(fs) >= count and len(al) >= count:
                found[:] = list(zip(fs, al))
                return True
            return False

        procs = tuple(n for n in ("bearerbox", "fakesmsc") if n in self.procs)
        self._wait(f"{count} SMS to {to} at the fake SMSC", check, procs, timeout)
        return found


@pytest.fixture(scope="module")
def kannel():
    """A running Kannel for the test module; everything stopped by PID at teardown."""
    k = Kannel()
    try:
        k.start()
        yield k
    finally:
        try:
            k.stop()
        finally:
            k.cleanup()
