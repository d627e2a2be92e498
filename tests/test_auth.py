"""Worked authentication examples of PROTOCOL.md §7 and vectors/README.md, and the session's
use of them (challenge, nonce rotation, replay, HMAC, server credentials)."""
from __future__ import annotations

import base64

import pytest

from dmengine import auth
from dmengine._message import Command, Cred, Item, Message, Meta, SyncHdr
from dmengine._session import DmSession, SessionConfig, SessionState
from dmengine.errors import AuthError
from dmengine.events import AuthFailed, Authenticated, NonceIssued, SessionEnded
from dmengine import xmlcodec

N01 = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f90")
N02 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
N05 = bytes.fromhex("5566778899aabbccddeeff0011223344")
IMEI = "IMEI:356938035643809"


# --- worked examples -------------------------------------------------------------------

def test_bruce2_md5_and_basic():
    assert auth.md5_digest("Bruce2", "OhBehave", b"Nonce") == "Zz6EivR3yeaaENcRN6lpAQ=="
    assert auth.basic_cred("Bruce2", "OhBehave") == "QnJ1Y2UyOk9oQmVoYXZl"
    assert auth.verify_basic("QnJ1Y2UyOk9oQmVoYXZl", "Bruce2", "OhBehave")
    assert not auth.verify_basic("QnJ1Y2UyOk9oQmVoYXZm", "Bruce2", "OhBehave")
    assert not auth.verify_basic("***", "Bruce2", "OhBehave")


def test_dmclient01_digests():
    assert auth.md5_key("dmclient01", "clientpw-1") == b"DV4giKozqa1xsMX/tjaQjQ=="
    assert auth.decode_nonce("obLD1OX2BxgpOktcbX6PkA==") == N01
    assert auth.md5_digest("dmclient01", "clientpw-1", N01) == "tm7hGTZC6ySmdLd9yJZRmw=="
    assert auth.md5_digest("dmclient01", "clientpw-1", b"dmnonce-0002") == "hte5+W5eOvQdsGZHbQGJZg=="
    assert auth.decode_nonce("ZG1ub25jZS0wMDAy") == b"dmnonce-0002"
    assert auth.md5_digest("dmclient01", "clientpw-1", N05) == "FT7+f/aWIBOCoJB9h8TUyA=="
    assert auth.verify_md5("tm7hGTZC6ySmdLd9yJZRmw==", "dmclient01", "clientpw-1", N01)
    assert not auth.verify_md5("tm7hGTZC6ySmdLd9yJZRmw==", "dmclient01", "clientpw-1", N05)


def test_server_cred_vector_02():
    assert auth.decode_nonce("Dx4tPEtaaXiHlqW0w9Lh8A==") == N02
    assert auth.server_cred("acme-dms", "srv-secret-42", N02) == "1/OL4SqAnuAZtQ80y2O+nw=="


def test_hmac_over_vector_03(vectors_dir):
    body = (vectors_dir / "03-pkg3-client-results.wbxml").read_bytes()
    assert base64.b64encode(__import__("hashlib").md5(body).digest()) == b"+y9LTQ0L95D5Orb3u4EWLg=="
    mac = auth.hmac_mac("dmclient01", "clientpw-1", N05, body)
    assert mac == "iBsCr5KLeakRidsiWmmZgQ=="
    hdr = auth.parse_hmac_header('algorithm=MD5, username="dmclient01", mac=iBsCr5KLeakRidsiWmmZgQ==')
    assert (hdr.algorithm, hdr.username, hdr.mac) == ("MD5", "dmclient01", mac)
    assert auth.verify_hmac(hdr, "dmclient01", "clientpw-1", N05, body)
    assert not auth.verify_hmac(hdr, "dmclient01", "clientpw-1", N05, body + b" ")
    assert not auth.verify_hmac(hdr, "dmclient01", "clientpw-2", N05, body)
    assert auth.format_hmac_header("dmclient01", mac) == \
        'algorithm=MD5, username="dmclient01", mac=iBsCr5KLeakRidsiWmmZgQ=='


@pytest.mark.parametrize("value", [
    "", "username=\"a\"", "mac=x", 'algorithm=SHA1, username="a", mac=x', 'username="a, mac=x',
    'username="a", username="b", mac=x', "garbage", "x" * 5000,
])
def test_bad_hmac_headers(value):
    with pytest.raises(AuthError):
        auth.parse_hmac_header(value)


def test_nonces_random_and_sized():
    a, b = auth.new_nonce(), auth.new_nonce()
    assert len(a) == len(b) == 16 and a != b
    with pytest.raises(ValueError):
        auth.new_nonce(lambda n: b"short")
    with pytest.raises(AuthError):
        auth.decode_nonce("not base64!")


def test_check_client_decisions():
    acc = auth.DmAccount(dev_id=IMEI, username="dmclient01", client_secret="clientpw-1", client_nonce=N01)
    ok = auth.check_client("md5", cred_type="syncml:auth-md5", cred_data="tm7hGTZC6ySmdLd9yJZRmw==",
                           loc_name="dmclient01", account=acc, nonce=N01)
    assert ok.ok and ok.status == 212 and ok.scheme == "md5"
    missing = auth.check_client("md5", cred_type=None, cred_data=None, loc_name=None, account=acc, nonce=N01)
    assert not missing.ok and missing.status == 407
    basic_for_md5 = auth.check_client("md5", cred_type="syncml:auth-basic",
                                      cred_data=auth.basic_cred("dmclient01", "clientpw-1"),
                                      loc_name=None, account=acc, nonce=N01)
    assert not basic_for_md5.ok and basic_for_md5.status == 401
    basic = auth.check_client("basic", cred_type="syncml:auth-basic",
                              cred_data=auth.basic_cred("dmclient01", "clientpw-1"),
                              loc_name=None, account=acc, nonce=None)
    assert basic.ok and basic.scheme == "basic"
    wrong_user = auth.check_client("md5", cred_type="syncml:auth-md5", cred_data="tm7hGTZC6ySmdLd9yJZRmw==",
                                   loc_name="intruder", account=acc, nonce=N01)
    assert not wrong_user.ok and wrong_user.status == 401
    unknown = auth.check_client("md5", cred_type="syncml:auth-md5", cred_data="x", loc_name="a",
                                account=None, nonce=None)
    assert not unknown.ok
    assert auth.check_client("none", cred_type=None, cred_data=None, loc_name=None, account=None,
                             nonce=None).ok
    assert "clientpw" not in repr(acc)


# --- the session's authentication -----------------------------------------------------

def _cfg(**kw):
    kw.setdefault("encoding", "xml")
    return SessionConfig(server_id="acme-dms", server_uri="https://dm.example.com/dm", **kw)


def _account(nonce=N01):
    return auth.DmAccount(dev_id=IMEI, username="dmclient01", client_secret="clientpw-1",
                          client_nonce=nonce, server_id="acme-dms", server_secret="srv-secret-42",
                          server_nonce=N02)


def _pkg1(msg_id="1", cred=None, session_id="1A2B", name="dmclient01"):
    return Message(
        hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id=session_id, msg_id=msg_id,
                    target="https://dm.example.com/dm", source=IMEI, source_name=name,
                    cred=cred, meta=Meta(max_msg_size="10000")),
        commands=[Command(name="Alert", cmd_id="1", data="1201"),
                  Command(name="Replace", cmd_id="2",
                          items=[Item(source="./DevInfo/DevId", data=IMEI)])],
        final=True)


def _md5(nonce):
    return Cred(meta=Meta(format="b64", type="syncml:auth-md5"),
                data=auth.md5_digest("dmclient01", "clientpw-1", nonce))


def test_vector_01_authenticates_and_rotates_nonce(vectors_dir):
    s = DmSession(_cfg(), session_key="k", resp_uri=None, now=0)
    msg = xmlcodec.decode((vectors_dir / "01-pkg1-client-init.xml").read_bytes())
    ev = s.receive(msg, now=1, account=_account())
    assert Authenticated("dmclient01", "md5") in ev
    issued = [e for e in ev if isinstance(e, NonceIssued)]
    assert len(issued) == 1 and len(issued[0].nonce) == 16 and issued[0].nonce != N01
    reply = s.next_message(now=2)
    st = reply.commands[0]
    assert st.cmd == "SyncHdr" and st.data == "212"
    assert auth.decode_nonce(st.chal.meta.next_nonce) == issued[0].nonce
    # our own credentials, computed with the nonce the device gave us (vector 02)
    assert reply.hdr.cred.data == "1/OL4SqAnuAZtQ80y2O+nw==" and reply.hdr.source_name == "acme-dms"


def test_replayed_nonce_fails_in_the_next_session():
    acc = _account()
    s1 = DmSession(_cfg(), session_key="k1", resp_uri=None, now=0)
    ev = s1.receive(_pkg1(cred=_md5(N01)), now=1, account=acc)
    acc.client_nonce = next(e.nonce for e in ev if isinstance(e, NonceIssued))   # the caller persists it
    s2 = DmSession(_cfg(), session_key="k2", resp_uri=None, now=2)
    ev2 = s2.receive(_pkg1(cred=_md5(N01), session_id="1A2C"), now=3, account=acc)  # same Cred again
    failed = [e for e in ev2 if isinstance(e, AuthFailed)]
    assert failed and failed[0].status == 401
    assert s2.state is SessionState.OWE_CHALLENGE
    reply = s2.next_message(now=4)
    assert [c.data for c in reply.commands] == ["401", "401", "401"] and reply.final
    assert reply.commands[0].chal.meta.type == "syncml:auth-md5"
    assert s2.state is SessionState.AUTH_PENDING


def test_challenge_then_retry_with_fresh_nonce():
    acc = _account(nonce=None)
    s = DmSession(_cfg(), session_key="k", resp_uri="https://dm.example.com/dm/k", now=0)
    ev = s.receive(_pkg1(cred=None), now=1, account=acc)
    assert any(isinstance(e, AuthFailed) and e.status == 407 for e in ev)
    nonce = next(e.nonce for e in ev if isinstance(e, NonceIssued))
    reply = s.next_message(now=2)
    assert reply.commands[0].data == "407"
    assert auth.decode_nonce(reply.commands[0].chal.meta.next_nonce) == nonce
    acc.client_nonce = nonce
    ev = s.receive(_pkg1(msg_id="2", cred=_md5(nonce)), now=3, account=acc)
    assert Authenticated("dmclient01", "md5") in ev
    assert s.state is SessionState.OWE_PACKAGE
    assert s.next_message(now=4).commands[0].data == "212"


def test_three_failures_end_the_session():
    s = DmSession(_cfg(max_auth_attempts=3), session_key="k", resp_uri=None, now=0)
    acc = _account()
    for i in range(1, 4):
        ev = s.receive(_pkg1(msg_id=str(i), cred=_md5(b"wrong")), now=i, account=acc)
        s.next_message(now=i)
    assert any(isinstance(e, SessionEnded) and e.reason == "auth_failed" for e in ev)
    assert s.ended and s.end_reason == "auth_failed"


def test_basic_auth_session():
    s = DmSession(_cfg(require_auth="basic"), session_key="k", resp_uri=None, now=0)
    cred = Cred(meta=Meta(format="b64", type="syncml:auth-basic"), data=auth.basic_cred("dmclient01", "clientpw-1"))
    ev = s.receive(_pkg1(cred=cred), now=1, account=_account())
    assert Authenticated("dmclient01", "basic") in ev
    assert s.next_message(now=2).commands[0].data == "212"


def test_hmac_session_checks_every_message(vectors_dir):
    """HMAC: 200 on the SyncHdr, a new NextNonce in every reply, the exact body is checked."""
    cfg = _cfg(require_auth="hmac")
    acc = _account(nonce=N05)
    s = DmSession(cfg, session_key="k", resp_uri=None, now=0)
    m1 = _pkg1(cred=None)
    body1 = xmlcodec.encode(m1)
    h1 = auth.format_hmac_header("dmclient01", auth.hmac_mac("dmclient01", "clientpw-1", N05, body1))
    ev = s.receive(m1, now=1, account=acc, hmac_header=h1, body=body1)
    assert Authenticated("dmclient01", "hmac") in ev
    n2 = next(e.nonce for e in ev if isinstance(e, NonceIssued))
    s.queue("get", Command(name="Get", items=[Item(target="./DevInfo/Mod")]))
    r1 = s.next_message(now=2)
    assert r1.commands[0].data == "200"
    assert r1.commands[0].chal.meta.type == "syncml:auth-MAC"
    assert auth.decode_nonce(r1.commands[0].chal.meta.next_nonce) == n2
    # the server's own HMAC header over its reply
    out = xmlcodec.encode(r1)
    assert s.reply_hmac_header(out) == auth.format_hmac_header(
        "acme-dms", auth.hmac_mac("acme-dms", "srv-secret-42", N02, out))
    m2 = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="2",
                             target="https://dm.example.com/dm", source=IMEI),
                 commands=[Command(name="Status", cmd_id="1", msg_ref="1", cmd_ref="2", cmd="Get", data="200")],
                 final=True)
    body2 = xmlcodec.encode(m2)
    stale = auth.format_hmac_header("dmclient01", auth.hmac_mac("dmclient01", "clientpw-1", N05, body2))
    ev = s.receive(m2, now=3, account=acc, hmac_header=stale, body=body2)   # old nonce: refused
    assert any(isinstance(e, AuthFailed) for e in ev)
    assert any(isinstance(e, SessionEnded) and e.reason == "auth_failed" for e in ev)


def test_hmac_good_second_message():
    cfg = _cfg(require_auth="hmac")
    acc = _account(nonce=N05)
    s = DmSession(cfg, session_key="k", resp_uri=None, now=0)
    m1 = _pkg1(cred=None)
    b1 = xmlcodec.encode(m1)
    ev = s.receive(m1, now=1, account=acc, body=b1, hmac_header=auth.format_hmac_header(
        "dmclient01", auth.hmac_mac("dmclient01", "clientpw-1", N05, b1)))
    n2 = next(e.nonce for e in ev if isinstance(e, NonceIssued))
    s.queue("get", Command(name="Get", items=[Item(target="./DevInfo/Mod")]))
    s.next_message(now=2)
    m2 = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="2",
                             target="https://dm.example.com/dm", source=IMEI),
                 commands=[Command(name="Status", cmd_id="1", msg_ref="1", cmd_ref="2", cmd="Get", data="200")],
                 final=True)
    b2 = xmlcodec.encode(m2)
    ev = s.receive(m2, now=3, account=acc, body=b2, hmac_header=auth.format_hmac_header(
        "dmclient01", auth.hmac_mac("dmclient01", "clientpw-1", n2, b2)))
    assert not any(isinstance(e, AuthFailed) for e in ev)
    assert any(isinstance(e, NonceIssued) for e in ev)
    r = s.next_message(now=4)
    assert r.commands[0].data == "200" and s.ended and s.end_reason == "completed"
    # missing header when HMAC is required -> 407
    s3 = DmSession(cfg, session_key="k3", resp_uri=None, now=0)
    ev = s3.receive(_pkg1(cred=None), now=1, account=acc, body=b1)
    assert any(isinstance(e, AuthFailed) and e.status == 407 for e in ev)


def test_device_refuses_server_cred_and_sends_new_nonce():
    s = DmSession(_cfg(), session_key="k", resp_uri=None, now=0)
    s.receive(_pkg1(cred=_md5(N01)), now=1, account=_account())
    s.queue("g", Command(name="Get", items=[Item(target="./DevInfo/Mod")]))
    s.next_message(now=2)
    fresh = bytes(range(16))
    m = Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id="1A2B", msg_id="2",
                            target="https://dm.example.com/dm", source=IMEI),
                commands=[Command(name="Status", cmd_id="1", msg_ref="1", cmd_ref="0", cmd="SyncHdr",
                                  data="401", chal=__import__("dmengine._message", fromlist=["Chal"]).Chal(
                                      meta=Meta(format="b64", type="syncml:auth-md5",
                                                next_nonce=auth.nonce_b64(fresh)))),
                          Command(name="Status", cmd_id="2", msg_ref="1", cmd_ref="2", cmd="Get", data="200")],
                final=True)
    ev = s.receive(m, now=3, account=_account())
    assert any(isinstance(e, AuthFailed) and e.side == "server" for e in ev)
    assert any(type(e).__name__ == "ServerNonceReceived" and e.nonce == fresh for e in ev)
    r = s.next_message(now=4)
    assert r.hdr.cred.data == auth.server_cred("acme-dms", "srv-secret-42", fresh)


def test_account_caches_follow_secret_and_nonce_changes():
    acc = _account()
    k1 = acc.client_key()
    assert k1 == auth.md5_key("dmclient01", "clientpw-1") and acc.client_key() is k1
    acc.client_secret = "clientpw-2"                      # a new secret: K computed again
    assert acc.client_key() == auth.md5_key("dmclient01", "clientpw-2")
    assert auth.verify_md5_key(auth.md5_digest("dmclient01", "clientpw-2", N01), acc.client_key(), N01)
    assert not auth.verify_md5_key(auth.md5_digest("dmclient01", "clientpw-1", N01), acc.client_key(), N01)
    c1 = acc.server_cred_for("acme-dms", N02)
    assert c1 == auth.server_cred("acme-dms", "srv-secret-42", N02)
    assert acc.server_cred_for("acme-dms", N05) == auth.server_cred("acme-dms", "srv-secret-42", N05)
    acc.server_secret = "srv-secret-43"
    assert acc.server_cred_for("acme-dms", N05) == auth.server_cred("acme-dms", "srv-secret-43", N05)


def test_md5_digest_for_another_nonce_or_name_fails_with_cached_key():
    acc = _account()
    s = DmSession(_cfg(), session_key="k", resp_uri=None, now=0)
    assert Authenticated("dmclient01", "md5") in s.receive(_pkg1(cred=_md5(N01)), now=1, account=acc)
    # K is cached on the account now; a digest over another nonce, or a right digest under
    # another LocName, still fails
    s2 = DmSession(_cfg(), session_key="k2", resp_uri=None, now=0)
    ev = s2.receive(_pkg1(cred=_md5(N05)), now=1, account=acc)
    assert [e.status for e in ev if isinstance(e, AuthFailed)] == [401]
    s3 = DmSession(_cfg(), session_key="k3", resp_uri=None, now=0)
    ev = s3.receive(_pkg1(cred=_md5(N01), name="someone"), now=1, account=acc)
    assert [e.status for e in ev if isinstance(e, AuthFailed)] == [401]


# --- nonce re-synchronisation (PROTOCOL.md §8.2) ------------------------------------------

@pytest.mark.parametrize("resync_nonce", [auth.RESYNC_NONCE_ASCII, auth.RESYNC_NONCE_BYTES])
def test_resync_nonce_accepted_after_a_resync_notification(resync_nonce):
    acc = _account(nonce=N05)                  # we think the device holds N05; it lost it
    acc.resync = True                           # ... and we sent it a resync package #0
    s = DmSession(_cfg(), session_key="k", resp_uri=None, now=0)
    ev = s.receive(_pkg1(cred=_md5(resync_nonce)), now=1, account=acc)
    assert Authenticated("dmclient01", "md5", resync_nonce) in ev
    fresh = next(e.nonce for e in ev if isinstance(e, NonceIssued))
    assert fresh not in auth.RESYNC_NONCES
    reply = s.next_message(now=2)
    st = reply.commands[0]
    assert st.data == "212" and auth.decode_nonce(st.chal.meta.next_nonce) == fresh
    # we authenticate ourselves with the same well-known nonce (the device holds no other)
    assert reply.hdr.cred.data == auth.server_cred("acme-dms", "srv-secret-42", resync_nonce)


def test_resync_nonce_refused_without_a_resync_notification():
    s = DmSession(_cfg(), session_key="k", resp_uri=None, now=0)
    ev = s.receive(_pkg1(cred=_md5(auth.RESYNC_NONCE_ASCII)), now=1, account=_account(nonce=N05))
    assert not any(isinstance(e, Authenticated) for e in ev)
    assert any(isinstance(e, AuthFailed) and e.status == 401 for e in ev)
    # and the stored nonce still wins when the device did not lose it
    acc = _account(nonce=N05)
    acc.resync = True
    s = DmSession(_cfg(), session_key="k2", resp_uri=None, now=0)
    ev = s.receive(_pkg1(cred=_md5(N05)), now=1, account=acc)
    assert Authenticated("dmclient01", "md5", None) in ev
    assert s.next_message(now=2).hdr.cred.data == auth.server_cred("acme-dms", "srv-secret-42", N02)

