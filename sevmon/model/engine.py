"""The memory encryption engine: per-ASID AES keys applied between the cores/PSP and DRAM.

Model: each guest key (VEK) is an AES-128 data key plus an AES-128 tweak key. A 16-byte
block at system physical address ``spa`` is stored as::

    C = E_K(P xor T) xor T,   T = E_Kt(spa >> 4)   (block index as a 128-bit big-endian int)

which gives the properties a debugger can observe on real hardware (sev-api.md §4): 16-byte
granularity, the same plaintext at two addresses encrypts differently, and ciphertext moved
to another address or read under another key comes back as garbage — with no freshness
(same key, address and plaintext give the same ciphertext).

Why it is fast: ``T`` for a run of consecutive blocks is exactly the AES-CTR keystream
started at counter ``spa >> 4``, so "xor T" is one CTR pass. A whole run (many pages) costs
three ``cryptography`` calls — CTR, ECB, CTR — processed in 1 MiB slices with
``update_into`` to stay in cache; there is no Python loop per block.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
_SLICE = 1 << 20
_SMALL = 1 << 14  # up to here the xors are done on Python integers (one CTR context, not two)
_U128 = (1 << 128) - 1


class PhysicalMemory(Protocol):
    """Bytes at rest by system physical address (what DRAM holds)."""

    def read(self, spa: int, n: int) -> bytes: ...

    def write(self, spa: int, data: bytes) -> None: ...


class MemoryKey:
    """One VEK: what ACTIVATE installs in the memory controller's slot for an ASID."""

    __slots__ = ("_data_key", "_tweak_key", "_tweak", "_ecb_enc", "_ecb_dec", "_ecb_lock")

    def __init__(self, material: bytes | None = None):
        """``material`` is 32 bytes (data key || tweak key); random when omitted."""
        material = os.urandom(32) if material is None else bytes(material)
        if len(material) != 32:
            raise ValueError("a memory key is 32 bytes: AES-128 data key || AES-128 tweak key")
        self._data_key = material[:16]
        self._tweak_key = material[16:]
        self._tweak = algorithms.AES(self._tweak_key)
        # ECB holds no state between whole blocks: one context per direction serves every access of this key
        aes = Cipher(algorithms.AES(self._data_key), modes.ECB())
        self._ecb_enc = aes.encryptor()
        self._ecb_dec = aes.decryptor()
        self._ecb_lock = threading.Lock()  # a cipher context is one thread's at a time (the PSP, the guest's CPU)

    def encrypt(self, spa: int, plaintext: bytes) -> bytes:
        """Ciphertext of ``plaintext`` stored at ``spa`` (both 16-byte aligned in extent)."""
        return self._xex(spa, plaintext, encrypt=True)

    def decrypt(self, spa: int, ciphertext: bytes) -> bytes:
        """Plaintext of ``ciphertext`` found at ``spa``."""
        return self._xex(spa, ciphertext, encrypt=False)

    def _xex(self, spa: int, data: bytes, *, encrypt: bool) -> bytes:
        n = len(data)
        if spa % BLOCK or n % BLOCK:
            raise ValueError(f"engine access must be 16-byte aligned (spa={spa:#x}, len={n:#x})")
        if n == 0:
            return b""
        iv = ((spa >> 4) & _U128).to_bytes(16, "big")
        core = self._ecb_enc if encrypt else self._ecb_dec
        if n <= _SMALL:
            # one keystream T for both xors, applied as big-integer xors (cheaper than a second CTR context
            # for a page or so)
            t = int.from_bytes(Cipher(self._tweak, modes.CTR(iv)).encryptor().update(bytes(n)), "little")
            with self._ecb_lock:
                x = core.update((int.from_bytes(data, "little") ^ t).to_bytes(n, "little"))
            return (int.from_bytes(x, "little") ^ t).to_bytes(n, "little")
        pre = Cipher(self._tweak, modes.CTR(iv)).encryptor()
        post = Cipher(self._tweak, modes.CTR(iv)).encryptor()
        aes = Cipher(algorithms.AES(self._data_key), modes.ECB())  # a large run: a context of its own
        core = aes.encryptor() if encrypt else aes.decryptor()
        if n <= _SLICE:
            return post.update(core.update(pre.update(data)))
        # Large runs: slice so the three passes reuse cache-resident buffers.
        out = bytearray(n + BLOCK - 1)  # update_into wants block_size-1 bytes of slack
        t1 = bytearray(_SLICE + BLOCK - 1)
        t2 = bytearray(_SLICE + BLOCK - 1)
        src, dst, v1, v2 = memoryview(data), memoryview(out), memoryview(t1), memoryview(t2)
        for off in range(0, n, _SLICE):
            m = min(_SLICE, n - off)
            pre.update_into(src[off:off + m], t1)
            core.update_into(v1[:m], t2)
            post.update_into(v2[:m], dst[off:off + m + BLOCK - 1])
        dst.release()
        del out[n:]
        return out  # a bytearray: copying 64 MiB again would cost more than the cipher


class MemoryController:
    """The UMC: key slots indexed by ASID in front of DRAM.

    ASID 0 is the host and passes bytes through unchanged (the modelled host runs without
    SME). Encrypted accesses need not be aligned: like the CPU's cache-line writes, an
    unaligned store is a read-modify-write of the enclosing 16-byte blocks.
    """

    def __init__(self, dram: PhysicalMemory):
        self.dram = dram
        self._slots: dict[int, MemoryKey] = {}

    def install_key(self, asid: int, key: MemoryKey) -> None:
        self._slots[asid] = key

    def has_key(self, asid: int) -> bool:
        return asid in self._slots

    def clear(self) -> None:
        self._slots.clear()

    def _key(self, asid: int) -> MemoryKey:
        key = self._slots.get(asid)
        if key is None:
            raise LookupError(f"no key is installed for ASID {asid}")
        return key

    def read(self, spa: int, n: int, asid: int = 0) -> bytes:
        """Bytes at ``[spa, spa+n)`` as seen through ASID ``asid``'s key."""
        if asid == 0:
            return self.dram.read(spa, n)
        key = self._key(asid)
        lo = spa & ~(BLOCK - 1)
        hi = (spa + n + BLOCK - 1) & ~(BLOCK - 1)
        plain = key.decrypt(lo, self.dram.read(lo, hi - lo))
        if lo == spa and hi - lo == n:
            return plain
        return plain[spa - lo:spa - lo + n]

    def encrypt_at(self, spa: int, data: bytes, asid: int) -> bytes:
        """What storing ``data`` (16-byte aligned) at ``spa`` through ASID ``asid``'s key would leave in DRAM."""
        return bytes(self._key(asid).encrypt(spa, data))

    def write(self, spa: int, data: bytes, asid: int = 0) -> None:
        """Store ``data`` at ``spa`` through ASID ``asid``'s key."""
        if asid == 0:
            self.dram.write(spa, data)
            return
        key = self._key(asid)
        n = len(data)
        lo = spa & ~(BLOCK - 1)
        hi = (spa + n + BLOCK - 1) & ~(BLOCK - 1)
        if lo != spa or hi - lo != n:  # read-modify-write of the partial blocks
            merged = bytearray(key.decrypt(lo, self.dram.read(lo, hi - lo)))
            merged[spa - lo:spa - lo + n] = data
            data = merged
        self.dram.write(lo, key.encrypt(lo, data))
