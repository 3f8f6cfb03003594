"""Server keys: where one `chunk_secret` keeps its chunks on a shared server.

Without a secret a chunk's server key is `KEY_PREFIX` + its chunk key (lower-case hex:
namespace digest + chunk digest). With one, every secret has its own key space:
`KEY_PREFIX` + the secret's public key id (the one every chunk header names) + ":" + a BLAKE3
digest of the chunk key, keyed by a key derived from the secret (its own derivation context,
independent of the MAC key). So tenants with different secrets never overwrite each other's
chunks, and one cannot tell from the server which prompts another has cached: it cannot
compute the other's server keys. Nothing from user input reaches a server key.
"""

from __future__ import annotations

import blake3

from lmcache_triton.chunk.format import KEY_RE, ChunkAuth, check_key

__all__ = ["KEY_PREFIX", "KEY_RE", "KeySpace", "check_key"]

KEY_PREFIX = "lmct:"
_SPACE_CONTEXT = "lmcache_triton 2026-12 remote key space v1"


class KeySpace:
    """Where one `chunk_secret` keeps its chunks on a shared server (see module docstring).

    Args:
        secret: `chunk_secret` (None or empty: the unsigned space `KEY_PREFIX` + chunk key).
    """

    def __init__(self, secret: bytes | str | None) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        auth = ChunkAuth(secret)
        # Its own derivation context: the MAC key (ChunkAuth) and this one are independent.
        self._key = blake3.blake3(secret, derive_key_context=_SPACE_CONTEXT).digest() if secret else None
        self.prefix = KEY_PREFIX if auth.key_id is None else f"{KEY_PREFIX}{auth.key_id}:"
        self.keyed = self._key is not None

    def server_key(self, key: str) -> str:
        """The server key of chunk `key`; ValueError for a key that is not lower-case hex."""
        check_key(key)
        if self._key is None:
            return KEY_PREFIX + key
        return self.prefix + blake3.blake3(key.encode(), key=self._key).hexdigest()

    def owns(self, server_key: str) -> bool:
        """True for a server key of this space (`SCAN` matches more: another secret's keys under
        the unsigned prefix, foreign keys)."""
        return server_key.startswith(self.prefix) and bool(KEY_RE.match(server_key[len(self.prefix) :]))
