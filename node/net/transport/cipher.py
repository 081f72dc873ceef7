"""One direction of a Noise transport session: the ChaChaPoly cipher state (Noise spec, section 5.1).

The only place in the node that knows the Noise ChaChaPoly nonce layout (4 zero bytes, then the
64-bit message counter little-endian). Encryption itself is `cryptography`'s ChaCha20Poly1305.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

MAX_NONCE = 2**64 - 1  # Noise reserves this counter value: a session that reaches it must stop
TAG_BYTES = 16  # Poly1305 tag appended to every ciphertext
_NONCE_PAD = b"\x00" * 4  # Noise ChaChaPoly nonce: 32 zero bits, then the counter little-endian


class CipherStateError(Exception):
    """Root of this module's errors."""


class NonceExhaustedError(CipherStateError):
    """The session sent or received 2**64 - 1 messages: Noise forbids another one under this key."""


class ChaChaPolyState:
    """A Noise CipherState for ChaChaPoly with associated data always empty (as libp2p's Noise uses it).

    `n` counts the messages sealed (or opened) so far; a failed open leaves it unchanged, as the
    spec requires. InvalidTag (from `cryptography`) signals a forged or corrupted message.
    """

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes, n: int = 0) -> None:
        if len(key) != 32:
            raise ValueError(f"ChaChaPoly keys are 32 bytes, got {len(key)}")
        if not 0 <= n <= MAX_NONCE:
            raise ValueError(f"nonce must be within [0, 2**64 - 1], got {n}")
        self._aead = ChaCha20Poly1305(key)
        self.n = n

    def _next_nonce(self) -> bytes:
        n = self.n
        if n >= MAX_NONCE:
            raise NonceExhaustedError("Noise nonce exhausted: the session must end")
        return _NONCE_PAD + n.to_bytes(8, "little")

    def seal_into(self, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Write ENCRYPT(k, n++, b"", plaintext) into `out` (exactly len(plaintext) + TAG_BYTES long)."""
        self._aead.encrypt_into(self._next_nonce(), plaintext, None, out)
        self.n += 1

    def seal(self, plaintext: bytes | memoryview) -> bytes:
        """ENCRYPT(k, n++, b"", plaintext) as a new bytes object."""
        out = self._aead.encrypt(self._next_nonce(), plaintext, None)
        self.n += 1
        return out

    def open(self, ciphertext: bytes | memoryview) -> bytes:
        """DECRYPT(k, n++, b"", ciphertext) (InvalidTag if forged; n is then not advanced)."""
        plain = self._aead.decrypt(self._next_nonce(), ciphertext, None)
        self.n += 1
        return plain
