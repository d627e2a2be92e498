# cython: language_level=3, freethreading_compatible=False
"""DmAccount (L2): what authentication needs for one device, as an extension type.

``dmengine.auth`` is its public home.  It is compiled because the session reads it for every
package 1 (name, secrets, nonces and two caches): as a slotted Python class each of those reads
was a generic attribute lookup.  The digest helpers come from ``dmengine.auth`` at first use
(auth imports this module, not the other way round at import time).
"""

cdef class DmAccount:
    """What authentication needs for one device; the caller loads it from its store.

    ``client_nonce``: the nonce the device must use next (the last one we issued).
    ``server_nonce``: the nonce the device gave us for authenticating ourselves.
    ``resync``: the server sent this device a package #0 signed with the re-synchronisation
    nonce (PROTOCOL.md §8.2), so its package 1 may carry a digest made with that nonce; only
    the caller knows, and it should say so only while such a notification is recent.
    ``client_key`` / ``server_key``: ``K = B64(MD5(name ":" password))`` for an account whose
    passwords are not kept; MD5 and HMAC need nothing more (BASIC needs the password).  An
    account with neither a client secret nor a client key is refused here: authenticating it
    against an empty password would let anyone in.
    """

    def __init__(self, *, dev_id, username, client_secret=None, client_nonce=None,
                 server_id=None, server_secret=None, server_nonce=None, resync=False,
                 client_key=None, server_key=None):
        if client_secret is None and client_key is None:
            raise ValueError("a DM account needs a client secret or a client key")
        self.dev_id = dev_id
        self.username = username
        self.client_secret = client_secret
        self.client_nonce = client_nonce
        self.server_id = server_id
        self.server_secret = server_secret
        self.server_nonce = server_nonce
        self.resync = resync
        # a given key stands in for the secret only when the secret is not kept
        self._kc = (username, None, _as_bytes(client_key)) \
            if client_secret is None and client_key is not None else None
        self._sc = None
        self._sk = None if server_key is None else _as_bytes(server_key)

    def client_key(self):
        """``K = B64(MD5(username ":" client_secret))`` (what MD5 and HMAC verification need),
        computed once and recomputed only when the name or the secret changes."""
        kc = self._kc
        if kc is not None and (<tuple>kc)[0] is self.username and (<tuple>kc)[1] is self.client_secret:
            return (<tuple>kc)[2]
        if self.client_secret is None:
            raise ValueError("the account's client key was made for another user name")
        from dmengine.auth import md5_key
        k = md5_key(self.username, self.client_secret)
        self._kc = (self.username, self.client_secret, k)
        return k

    def server_cred_for(self, server_id, nonce):
        """Our MD5 Cred/Data for ``nonce`` (the device's nonce for us): computed once per
        nonce, again whenever the nonce, the name or the secret changes."""
        sc = self._sc
        if sc is not None and (<tuple>sc)[0] == server_id and (<tuple>sc)[1] is self.server_secret \
                and (<tuple>sc)[2] == nonce:
            return (<tuple>sc)[3]
        from dmengine.auth import server_cred, server_cred_key
        if self.server_secret is None and self._sk is not None:
            d = server_cred_key(self._sk, nonce)
        else:
            d = server_cred(server_id, self.server_secret or b"", nonce)
        self._sc = (server_id, self.server_secret, nonce, d)
        return d

    def server_key(self):
        """The ``K`` of our own credentials this account was given (None: none given; the
        server secret, when kept, is used instead)."""
        return self._sk

    def __repr__(self):  # never print secrets
        return f"DmAccount(dev_id={self.dev_id!r}, username={self.username!r}, server_id={self.server_id!r})"


cdef bytes _as_bytes(v):
    return v.encode("ascii") if isinstance(v, str) else bytes(v)
