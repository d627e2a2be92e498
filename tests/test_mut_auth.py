"""Issue 18: the HMAC user name must be compared with the account (a mutant that dropped the
comparison went unnoticed), at the function, in ``check_client`` and on the device port."""
from __future__ import annotations

import asyncio

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from dmengine import auth
from dmengine.message import Command, Item
from dmengine.metrics import DeviceMetrics
from dmengine.server import DmServer, MemoryDeviceHandler, ServerConfig
from dmengine.simulator.device import DeviceProfile
from dmengine.simulator.fleet import Fleet, HttpClient
from dmengine.status import StatusCode

N = bytes.fromhex("5566778899aabbccddeeff0011223344")
BODY = b"<SyncML>the exact body</SyncML>"


def _acc() -> auth.DmAccount:
    return auth.DmAccount(dev_id="IMEI:356938035643809", username="dmclient01",
                          client_secret="clientpw-1", client_nonce=N)


def test_verify_hmac_needs_the_account_name_in_the_header():
    mac = auth.hmac_mac("dmclient01", "clientpw-1", N, BODY)      # the right MAC …
    good = auth.parse_hmac_header(auth.format_hmac_header("dmclient01", mac))
    other = auth.parse_hmac_header(auth.format_hmac_header("mallory", mac))  # … another name
    assert auth.verify_hmac(good, "dmclient01", "clientpw-1", N, BODY)
    assert not auth.verify_hmac(other, "dmclient01", "clientpw-1", N, BODY)
    key = auth.md5_key("dmclient01", "clientpw-1")
    assert auth.verify_hmac_key(good, "dmclient01", key, N, BODY)
    assert not auth.verify_hmac_key(other, "dmclient01", key, N, BODY)
    # the name alone is not enough either
    assert not auth.verify_hmac_key(good, "dmclient01", key, N, BODY + b" ")


def test_check_client_refuses_an_hmac_header_naming_another_user():
    mac = auth.hmac_mac("dmclient01", "clientpw-1", N, BODY)
    res = auth.check_client("hmac", cred_type=None, cred_data=None, loc_name=None, account=_acc(),
                            nonce=N, hmac_header=auth.format_hmac_header("mallory", mac), body=BODY)
    assert not res.ok and res.status == StatusCode.INVALID_CREDENTIALS
    assert res.reason == "HMAC mismatch" and res.username == "mallory"
    ok = auth.check_client("hmac", cred_type=None, cred_data=None, loc_name=None, account=_acc(),
                           nonce=N, hmac_header=auth.format_hmac_header("dmclient01", mac), body=BODY)
    assert ok.ok and ok.status == StatusCode.OK and ok.username == "dmclient01"


@pytest.mark.parametrize("claimed,outcome", [("dmclient-of-the-device", "completed"),
                                             ("mallory", "auth_failed")])
def test_device_port_refuses_an_hmac_header_with_another_name(monkeypatch, claimed, outcome):
    """A device whose x-syncml-hmac names another user, with the MAC of its own key, is
    refused over real HTTP; the same device naming itself gets through."""
    real_format = auth.format_hmac_header
    device_name: list[str] = []

    def device_header(username: str, mac: str, algorithm: str = "MD5") -> str:
        # the simulator formats its header through dmengine.auth: this device names `claimed`
        if username == device_name[0] and claimed == "mallory":
            username = "mallory"
        return real_format(username, mac, algorithm)

    async def main() -> tuple[str, list]:
        handler = MemoryDeviceHandler()
        srv = await DmServer(ServerConfig(require_auth="hmac", tick=0.05), handler,
                             metrics=DeviceMetrics(CollectorRegistry())).start()
        fleet = Fleet(DeviceProfile(server_url=srv.url, auth="hmac"), 1,
                      client=HttpClient(timeout=10))
        dev = fleet.devices[0]
        device_name.append(dev.username)
        handler.add_account(dev.account())
        handler.queue_on_connect[dev.dev_id] = [Command(name="Get",
                                                        items=[Item(target="./DevDetail/SwV")])]
        monkeypatch.setattr(auth, "format_hmac_header", device_header)
        try:
            rep = await fleet.run_session(dev)
        finally:
            fleet.close()
            await srv.shutdown(0.5)
        return rep.outcome, [e for d, e in handler.events if type(e).__name__ == "Authenticated"]

    got, authenticated = uvloop.run(main())
    if outcome == "completed":
        assert got == "completed" and [e.scheme for e in authenticated] == ["hmac"]
    else:
        assert got != "completed" and authenticated == [], got


# --- every decision of check_client, all of its answer (mutmut's survivors in auth.py: the
# reasons, schemes and names of the answers were never compared) ---------------------------

MD5_OK = auth.md5_digest("dmclient01", "clientpw-1", N)
BASIC_OK = auth.basic_cred("dmclient01", "clientpw-1")
MAC_OK = auth.format_hmac_header("dmclient01", auth.hmac_mac("dmclient01", "clientpw-1", N, BODY))
MAC_BAD = auth.format_hmac_header("dmclient01", auth.hmac_mac("dmclient01", "other", N, BODY))
KEY_ONLY = auth.DmAccount(dev_id="IMEI:356938035643809", username="dmclient01",
                          client_key=auth.md5_key("dmclient01", "clientpw-1"), client_nonce=N)
MD5T, BASICT = "syncml:auth-md5", "syncml:auth-basic"
R = StatusCode


@pytest.mark.parametrize("require,kw,want", [
    ("none", dict(loc_name="x"), (True, R.OK, "none", "x", "no authentication required")),
    # hmac
    ("hmac", dict(), (False, R.MISSING_CREDENTIALS, "hmac", "dmclient01", "no x-syncml-hmac header")),
    ("hmac", dict(account=None, loc_name="who"),
     (False, R.MISSING_CREDENTIALS, "hmac", "who", "no x-syncml-hmac header")),
    ("hmac", dict(hmac_header=MAC_OK, body=None),
     (False, R.INVALID_CREDENTIALS, "hmac", "dmclient01", "no body to check the HMAC over")),
    ("hmac", dict(hmac_header='algorithm=SHA1, username="a", mac=b', body=BODY),
     (False, R.INVALID_CREDENTIALS, "hmac", "dmclient01",
      "x-syncml-hmac: unsupported algorithm 'SHA1'")),
    ("hmac", dict(hmac_header=MAC_OK, body=BODY, account=None),
     (False, R.INVALID_CREDENTIALS, "hmac", "dmclient01", "unknown device")),
    ("hmac", dict(hmac_header=MAC_OK, body=BODY, nonce=None),
     (False, R.INVALID_CREDENTIALS, "hmac", "dmclient01", "no nonce issued yet")),
    ("hmac", dict(hmac_header=MAC_BAD, body=BODY),
     (False, R.INVALID_CREDENTIALS, "hmac", "dmclient01", "HMAC mismatch")),
    ("hmac", dict(hmac_header=MAC_OK, body=BODY), (True, R.OK, "hmac", "dmclient01", "HMAC verified")),
    ("hmac", dict(hmac_header=MAC_OK, body=BODY, account=KEY_ONLY),
     (True, R.OK, "hmac", "dmclient01", "HMAC verified")),
    # md5 and basic: what is missing or of the wrong kind
    ("md5", dict(cred_type=MD5T), (False, R.MISSING_CREDENTIALS, "md5", "dmclient01", "no Cred in SyncHdr")),
    ("md5", dict(cred_data=MD5_OK), (False, R.MISSING_CREDENTIALS, "md5", "dmclient01", "no Cred in SyncHdr")),
    ("basic", dict(cred_data=BASIC_OK),
     (False, R.MISSING_CREDENTIALS, "basic", "dmclient01", "no Cred in SyncHdr")),
    ("md5", dict(cred_type=BASICT, cred_data=BASIC_OK),
     (False, R.INVALID_CREDENTIALS, "md5", "dmclient01",
      "credential type 'syncml:auth-basic' not accepted (need syncml:auth-md5)")),
    ("basic", dict(cred_type="syncml:auth-MAC", cred_data="x"),
     (False, R.INVALID_CREDENTIALS, "basic", "dmclient01",
      "credential type 'syncml:auth-MAC' not accepted (need syncml:auth-basic)")),
    ("md5", dict(cred_type="x-other", cred_data="x"),
     (False, R.INVALID_CREDENTIALS, "md5", "dmclient01",
      "credential type 'x-other' not accepted (need syncml:auth-md5)")),
    ("md5", dict(cred_type=MD5T, cred_data=MD5_OK, account=None, loc_name="who"),
     (False, R.INVALID_CREDENTIALS, "md5", "who", "unknown device")),
    ("md5", dict(cred_type=MD5T, cred_data=MD5_OK, loc_name="intruder"),
     (False, R.INVALID_CREDENTIALS, "md5", "intruder", "user name does not match the account")),
    # md5
    ("md5", dict(cred_type=MD5T, cred_data=MD5_OK, loc_name="dmclient01"),
     (True, R.AUTHENTICATION_ACCEPTED, "md5", "dmclient01", "credentials accepted")),
    ("md5", dict(cred_type=" SyncML:Auth-MD5 ", cred_data=MD5_OK),
     (True, R.AUTHENTICATION_ACCEPTED, "md5", "dmclient01", "credentials accepted")),
    ("md5", dict(cred_type=MD5T, cred_data=MD5_OK, account=KEY_ONLY),
     (True, R.AUTHENTICATION_ACCEPTED, "md5", "dmclient01", "credentials accepted")),
    ("md5", dict(cred_type=MD5T, cred_data=MD5_OK, nonce=None),
     (False, R.INVALID_CREDENTIALS, "md5", "dmclient01", "no nonce issued yet")),
    ("md5", dict(cred_type=MD5T, cred_data=auth.md5_digest("dmclient01", "clientpw-1", b"old-nonce-000000")),
     (False, R.INVALID_CREDENTIALS, "md5", "dmclient01", "digest mismatch (wrong secret or stale nonce)")),
    # basic (an MD5 Cred is accepted where basic is required: it is stronger)
    ("basic", dict(cred_type=BASICT, cred_data=BASIC_OK, nonce=None),
     (True, R.AUTHENTICATION_ACCEPTED, "basic", "dmclient01", "credentials accepted")),
    ("basic", dict(cred_type=MD5T, cred_data=MD5_OK),
     (True, R.AUTHENTICATION_ACCEPTED, "md5", "dmclient01", "credentials accepted")),
    ("basic", dict(cred_type=BASICT, cred_data=auth.basic_cred("dmclient01", "guess")),
     (False, R.INVALID_CREDENTIALS, "basic", "dmclient01", "wrong password")),
    ("basic", dict(cred_type=BASICT, cred_data=BASIC_OK, account=KEY_ONLY),
     (False, R.INVALID_CREDENTIALS, "basic", "dmclient01",
      "basic needs the password; the account keeps only its key")),
])
def test_check_client_answers(require, kw, want):
    args = dict(cred_type=None, cred_data=None, loc_name=None, account=_acc(), nonce=N)
    args.update(kw)
    r = auth.check_client(require, **args)
    assert (r.ok, r.status, r.scheme, r.username, r.reason) == want
    assert repr(r) == (f"AuthResult(ok={want[0]}, status={r.status}, scheme={want[2]!r}, "
                       f"username={want[3]!r}, reason={want[4]!r})")


def test_check_client_refuses_an_unknown_requirement():
    with pytest.raises(ValueError, match="^require_auth must be md5, basic, hmac or none, not 'digest'$"):
        auth.check_client("digest", cred_type=None, cred_data=None, loc_name=None,
                          account=None, nonce=None)


@pytest.mark.parametrize("value,message", [
    ("x" * 1025, "x-syncml-hmac header too long"),
    ('algorithm=MD5, username', "x-syncml-hmac: parameter without '=' at 15"),
    ('username="abc, mac=x', "x-syncml-hmac: unterminated quoted string"),
    ('username=a, username=b, mac=c', "x-syncml-hmac: empty or repeated parameter 'username'"),
    ('=a, username=b, mac=c', "x-syncml-hmac: empty or repeated parameter ''"),
    ('algorithm=SHA-256, username=a, mac=b', "x-syncml-hmac: unsupported algorithm 'SHA-256'"),
    ('algorithm=MD5, mac=b', "x-syncml-hmac: username and mac are required"),
    ('algorithm=MD5, username=a', "x-syncml-hmac: username and mac are required"),
])
def test_parse_hmac_header_errors(value, message):
    with pytest.raises(auth.AuthError) as ei:
        auth.parse_hmac_header(value)
    assert str(ei.value) == message


@pytest.mark.parametrize("value,want", [
    ('algorithm=MD5, username="dm 01", mac=AbC=', ("dm 01", "AbC=")),
    (' , \tusername = "n,1" ,mac=  m1  ,', ("n,1", "m1")),           # separators, spaces
    ('USERNAME=n2,MAC=m2,Algorithm=md5', ("n2", "m2")),               # case of keys and MD5
    ('username=n3, mac=m3', ("n3", "m3")),                            # algorithm defaults to MD5
    ('username="' + "u" * 900 + '", mac=m', ("u" * 900, "m")),
])
def test_parse_hmac_header_forms(value, want):
    h = auth.parse_hmac_header(value)
    assert (h.algorithm, h.username, h.mac) == ("MD5", *want)


def test_server_credentials_and_nonces():
    key = auth.md5_key("acme-dms", "srv-secret-42")
    for nonce in (N, None, b""):
        assert auth.server_cred_key(key, nonce) == auth.server_cred("acme-dms", "srv-secret-42", nonce)
    assert auth.server_cred("acme-dms", "srv-secret-42", N) == auth.md5_digest("acme-dms", "srv-secret-42", N)
    assert auth.server_cred_key(key, None) != auth.server_cred_key(key, N)
    # NextNonce: base64 both ways, a bad one is an AuthError naming it
    assert auth.nonce_b64(N) == "VWZ3iJmqu8zd7v8AESIzRA=="
    assert auth.decode_nonce(" VWZ3iJmqu8zd7v8AESIzRA==\n") == N
    assert auth.decode_nonce(b"VWZ3iJmqu8zd7v8AESIzRA==") == N
    with pytest.raises(auth.AuthError, match="^NextNonce is not base64: "):
        auth.decode_nonce("not base64!")
    # nonce sources: 8..64 bytes accepted, others refused with the size asked for
    assert auth.new_nonce(lambda n: b"a" * n) == b"a" * 16
    assert auth.new_nonce(lambda n: b"b" * 8) == b"b" * 8
    assert auth.new_nonce(lambda n: b"c" * 64, size=64) == b"c" * 64
    assert len(auth.new_nonce()) == auth.NONCE_SIZE
    for bad in (b"x" * 7, b"x" * 65, "x" * 16):
        with pytest.raises(ValueError, match=r"^random_bytes\(16\) must return 8\.\.64 bytes$"):
            auth.new_nonce(lambda n, b=bad: b)
    # the wire forms, against values computed by hand (PROTOCOL.md §7.1)
    import base64 as b64
    import hashlib
    k = b64.b64encode(hashlib.md5(b"dmclient01:clientpw-1").digest())
    assert auth.md5_key("dmclient01", "clientpw-1") == k == auth.md5_key(b"dmclient01", b"clientpw-1")
    assert auth.md5_digest("dmclient01", "clientpw-1", N) == \
        b64.b64encode(hashlib.md5(k + b":" + N).digest()).decode()
    assert auth.basic_cred("dmclient01", "pw") == b64.b64encode(b"dmclient01:pw").decode()
    assert auth.basic_cred("dmclient01", "pw") == "ZG1jbGllbnQwMTpwdw=="
    bd = b64.b64encode(hashlib.md5(BODY).digest())
    assert auth.hmac_mac_key(k, N, BODY) == b64.b64encode(hashlib.md5(k + b":" + N + b":" + bd).digest()).decode()
    assert auth.verify_basic("  " + auth.basic_cred("dmclient01", "pw") + " ", "dmclient01", "pw")
    assert not auth.verify_basic("%%%", "dmclient01", "pw")
    assert auth.verify_md5(" " + auth.md5_digest("dmclient01", "pw", N) + "\n", "dmclient01", "pw", N)


@pytest.mark.parametrize("value,want", [
    ('username=a, mac=', ("a", "")),                       # a value may be empty at the end
    ('username="", mac=m', ("", "m")),                     # an empty quoted value
    ('username="a"mac=b', ("a", "b")),                     # no comma needed after a quote
    ('username=Xavier, mac=Xm', ("Xavier", "Xm")),         # values are kept as written
    ('username=a, mac=b, Xmac=c', ("a", "b")),             # unknown parameters are ignored
])
def test_parse_hmac_header_edges(value, want):
    h = auth.parse_hmac_header(value)
    assert (h.username, h.mac) == want


def test_hmac_header_length_limit_is_1024():
    head = 'username=a, mac='
    ok = head + "m" * (auth.MAX_HMAC_HEADER - len(head))
    assert len(ok) == 1024 and auth.parse_hmac_header(ok).mac == "m" * (1024 - len(head))
    with pytest.raises(auth.AuthError, match="too long"):
        auth.parse_hmac_header(ok + "m")


def test_base64_is_read_strictly():
    """A stray character is not skipped: the NextNonce is refused, the basic Cred wrong."""
    with pytest.raises(auth.AuthError, match="^NextNonce is not base64"):
        auth.decode_nonce("VWZ3iJmq!u8zd7v8AESIzRA==")
    good = auth.basic_cred("dmclient01", "pw")
    assert auth.verify_basic(good, "dmclient01", "pw")
    assert not auth.verify_basic(good[:4] + "!" + good[4:], "dmclient01", "pw")
