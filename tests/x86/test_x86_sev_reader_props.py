"""Property test of the production read path: random page tables in every mode are
launched into the SEV model (RAM becomes ciphertext), then walked through DebugMemory
with the cache on, off and unbatched, and through the naive one-entry-per-ioctl reader.
Every reader must print exactly what the walker prints over the plain tables, and a
warm repeat through the cache must cost no round trip."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_x86_paging_props import Builder

from sevmon.bench.readers import make_reader
from sevmon.debug.ops import SevOps
from sevmon.memory.ram import PAGE_SHIFT, RAM
from sevmon.model import SimulatedHost, SimulatedKvm
from sevmon.sev.vm import SevVm
from sevmon.x86 import paging
from tests.x86.x86_testmem import CountingMemory


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["32", "pae", "4level", "5level"]), cbit=st.sampled_from([0, 47, 51]),
       seed=st.integers(0, 2**32))
def test_sev_readers_agree_with_the_plain_walk(mode, cbit, seed):
    me = (1 << cbit) if cbit else 0
    b = Builder(random.Random(seed), mode, True, me)
    cpu = b.build()
    plain_tlb = list(paging.info_tlb(CountingMemory(b.ram), cpu, me))
    plain_mem = list(paging.info_mem(CountingMemory(b.ram), cpu, me))

    ram = RAM(b.ram.size)
    for pfn in b.ram.frames():
        ram.set_frame(pfn, bytes(b.ram.frame(pfn)))
    sev = SevVm(ram, cbitpos=cbit or 47, kernel=SimulatedKvm(SimulatedHost(cbitpos=cbit or 47)))
    sev.launch([(first << PAGE_SHIFT, ram.read(first << PAGE_SHIFT, n << PAGE_SHIFT)) for first, n in ram.runs()])
    sev.finish()
    assert all(bytes(ram.frame(p)) != bytes(b.ram.frame(p)) for p in ram.frames())  # ciphertext at rest

    ops = SevOps(ram, sev)
    entry = 4 if mode == "32" else 8
    for kind, pages in (("sevmon", 1024), ("sevmon", 0), ("per-page", 1024), ("naive", 0)):
        reader = make_reader(kind, ram, ops, cache_pages=pages, entry_size=entry)
        assert list(paging.info_tlb(reader, cpu, me)) == plain_tlb, kind
        if kind != "naive":  # the same reads again, one firmware call per entry: info tlb has checked them
            assert list(paging.info_mem(reader, cpu, me)) == plain_mem, kind
        if kind == "sevmon" and pages:
            before = sev.stats.round_trips
            assert list(paging.info_tlb(reader, cpu, me)) == plain_tlb
            assert sev.stats.round_trips == before
