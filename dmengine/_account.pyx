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
    """

    def __init__(self, *, dev_id, username, client_secret, client_nonce=None, server_id=None,
                 server_secret=None, server_nonce=None, resync=False):
        self.dev_id = dev_id
        self.username = username
        self.client_secret = client_secret
        self.client_nonce = client_nonce
        self.server_id = server_id
        self.server_secret = server_secret
        self.server_nonce = server_nonce
        self.resync = resync
        self._kc = None
        self._sc = None

    def client_key(self):
        """``K = B64(MD5(username ":" client_secret))`` (what MD5 and HMAC verification need),
        computed once and recomputed only when the name or the secret changes."""
        kc = self._kc
        if kc is not None and (<tuple>kc)[0] is self.username and (<tuple>kc)[1] is self.client_secret:
            return (<tuple>kc)[2]
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
        from dmengine.auth import server_cred
        d = server_cred(server_id, self.server_secret or b"", nonce)
        self._sc = (server_id, self.server_secret, nonce, d)
        return d

    def __repr__(self):  # never print secrets
        return f"DmAccount(dev_id={self.dev_id!r}, username={self.username!r}, server_id={self.server_id!r})"
