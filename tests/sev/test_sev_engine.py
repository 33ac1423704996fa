"""The memory encryption engine and CPUID Fn8000_001F (sev-api.md §4, §7.10)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmon.model.engine import MemoryController, MemoryKey
from sevmon.model.hostmem import HostMemory
from sevmon.sev.cpuid import SevCpuid

blocks = st.integers(1, 64).flatmap(lambda n: st.binary(min_size=16 * n, max_size=16 * n))
spas = st.integers(0, (1 << 52) - 1).map(lambda a: a & ~15)


@settings(max_examples=60, deadline=None)
@given(spa=spas, data=blocks)
def test_roundtrip(spa, data):
    k = MemoryKey()
    c = k.encrypt(spa, data)
    assert len(c) == len(data)
    assert k.decrypt(spa, c) == data


def test_matches_the_documented_xex_formula():
    material = bytes(range(32))
    k = MemoryKey(material)
    spa, p = 0x1234_5670, os.urandom(16)
    ecb = Cipher(algorithms.AES(material[:16]), modes.ECB()).encryptor()
    t = Cipher(algorithms.AES(material[16:]), modes.ECB()).encryptor().update((spa >> 4).to_bytes(16, "big"))
    xor = lambda a, b: bytes(x ^ y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert k.encrypt(spa, p) == xor(ecb.update(xor(p, t)), t)


def test_address_tweak_same_plaintext_differs_per_block():
    k = MemoryKey()
    page = bytes(4096)  # 256 identical blocks
    c = k.encrypt(0x10_0000, page)
    assert len({c[i:i + 16] for i in range(0, 4096, 16)}) == 256
    assert k.encrypt(0x10_0000, page) == c  # deterministic: no freshness
    assert k.encrypt(0x20_0000, page) != c


def test_moved_ciphertext_and_other_key_give_garbage():
    k, other = MemoryKey(), MemoryKey()
    p = os.urandom(4096)
    c = k.encrypt(0x5000, p)
    assert k.decrypt(0x6000, c) != p
    assert other.decrypt(0x5000, c) != p
    assert k.decrypt(0x5000, c) == p


def test_large_run_equals_blockwise_and_is_sliced_transparently():
    k = MemoryKey()
    p = os.urandom(3 * (1 << 20) + 4096)  # crosses the engine's 1 MiB slices
    c = k.encrypt(0x1_0000_0000, p)
    assert c[5 << 20 >> 2: (5 << 20 >> 2) + 64] == k.encrypt(0x1_0000_0000 + (5 << 20 >> 2), p[5 << 20 >> 2:][:64])
    assert k.decrypt(0x1_0000_0000, c) == p


def test_alignment_is_enforced():
    k = MemoryKey()
    with pytest.raises(ValueError):
        k.encrypt(8, bytes(16))
    with pytest.raises(ValueError):
        k.encrypt(0, bytes(15))
    with pytest.raises(ValueError):
        MemoryKey(bytes(16))


def test_memory_controller_asids_and_unaligned_rmw():
    dram = HostMemory()
    mc = MemoryController(dram)
    mc.install_key(5, MemoryKey())
    mc.write(0x1000, b"A" * 64, asid=5)
    assert dram.read(0x1000, 64) != b"A" * 64          # ciphertext at rest
    assert mc.read(0x1000, 64, asid=5) == b"A" * 64
    mc.write(0x1003, b"xyz", asid=5)                    # partial block: read-modify-write
    assert mc.read(0x1000, 8, asid=5) == b"AAAxyzAA"
    mc.write(0x3000, b"plain")                          # ASID 0: the host, no encryption
    assert dram.read(0x3000, 5) == b"plain"
    with pytest.raises(LookupError):
        mc.read(0x1000, 16, asid=6)


@pytest.mark.parametrize("cbitpos,ebx,mask", [(47, 0x6F, 1 << 47), (51, 0x73, 1 << 51)])
def test_cpuid_rome_and_milan(cbitpos, ebx, mask):
    c = SevCpuid.make(cbitpos=cbitpos, reduced_phys_bits=1)
    assert c.ebx & 0xFFF == ebx and c.me_mask == mask
    assert c.cbitpos == cbitpos and c.reduced_phys_bits == 1
    assert c.eax & 0b11 == 0b11 and c.sev and not c.sev_es
    assert c.num_encrypted_guests == 509 and c.min_sev_asid == 1


def test_cpuid_decodes_raw_registers_and_strips_cbit():
    c = SevCpuid(eax=0x1000F, ebx=(5 << 6) | 47, ecx=15, edx=9)  # Naples-class EPYC 3151
    assert (c.cbitpos, c.reduced_phys_bits, c.num_encrypted_guests, c.min_sev_asid) == (47, 5, 15, 9)
    assert c.sev_es
    pte = 0x0000_8000_0123_D063
    assert pte & c.me_mask
    assert (pte & ~c.me_mask) & 0x000F_FFFF_FFFF_F000 == 0x123D000
