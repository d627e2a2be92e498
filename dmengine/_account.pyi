"""Stubs for dmengine._account (Cython): DmAccount; import it from dmengine.auth."""
from __future__ import annotations

class DmAccount:
    """What authentication needs for one device; the caller loads it from its store."""
    dev_id: str | None
    username: str
    client_secret: str | bytes | None
    client_nonce: bytes | None
    server_id: str | None
    server_secret: str | bytes | None
    server_nonce: bytes | None
    resync: bool
    def __init__(self, *, dev_id: str | None, username: str,
                 client_secret: str | bytes | None = None,
                 client_nonce: bytes | None = None, server_id: str | None = None,
                 server_secret: str | bytes | None = None, server_nonce: bytes | None = None,
                 resync: bool = False, client_key: str | bytes | None = None,
                 server_key: str | bytes | None = None) -> None: ...
    def client_key(self) -> bytes: ...
    def server_key(self) -> bytes | None: ...
    def server_cred_for(self, server_id: str, nonce: bytes) -> str: ...
