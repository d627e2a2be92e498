# DmAccount's fields, cimported by _session.pyx so the authentication hot path reads them
# directly instead of through generic attribute lookups.

cdef class DmAccount:
    cdef public object dev_id, username, client_secret, client_nonce
    cdef public object server_id, server_secret, server_nonce
    cdef public bint resync     # we sent a re-synchronisation package #0 (see __init__)
    cdef public object _kc      # (username, client_secret, K) for the device's digests
    cdef public object _sc      # (server_id, server_secret, nonce, Cred/Data) we send
    cdef public object _sk      # the server key K (bytes) when no server secret is kept
