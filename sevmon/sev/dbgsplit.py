"""What Linux's classic ``sev_dbg_crypt`` makes of one DBG request: its chunks, PSP commands and bytes.

The real transport cannot see the PSP, so it counts from this rule (sev-api.md §2.1, §2.4): the range is cut only
at *source* page boundaries; per chunk, an aligned one (source, destination and length 16-aligned) is one command
of ``n`` bytes, an unaligned decrypt one command over the covering 16-byte blocks, an unaligned encrypt whose
destination or length is unaligned a read-modify-write (a decrypt of the covering blocks, then an encrypt of
``round_up(n, 16)`` bytes: bug (b)). The simulated kernel executes the same rule; a test holds the two equal.
"""

from __future__ import annotations

PAGE_SIZE = 4096


def classic_chunks(src: int, dst: int, length: int):
    """``(src, dst, n)`` of each chunk: cut at source page boundaries only."""
    while length > 0:
        n = min(PAGE_SIZE - (src & (PAGE_SIZE - 1)), length)
        yield src, dst, n
        src, dst, length = src + n, dst + n, length - n


def classic_dbg_cost(src: int, dst: int, length: int, *, encrypt: bool) -> tuple[int, int, int]:
    """``(firmware_calls, bytes_decrypted, bytes_encrypted)`` of one successful DBG_DECRYPT/ENCRYPT.

    ``src``/``dst`` are the user addresses; guest RAM and sevmon's buffers are page-aligned mappings, so the
    16-byte alignment of a physical address equals that of its user address."""
    calls = dec = enc = 0
    for s, d, n in classic_chunks(src, dst, length):
        if not ((s | d | n) & 15):
            calls += 1
            if encrypt:
                enc += n
            else:
                dec += n
        elif not encrypt:
            calls += 1
            dec += (n + (s & 15) + 15) & ~15
        elif d & 15 or n & 15:
            calls += 2
            dec += (n + (d & 15) + 15) & ~15
            enc += (n + 15) & ~15
        else:  # only the source unaligned: bounced by a copy, still one command
            calls += 1
            enc += n
    return calls, dec, enc


def crosses_destination_page(src: int, dst: int, length: int) -> bool:
    """True when some 16-aligned chunk's destination crosses a page: the classic kernel would make the PSP
    write past the single pinned destination page (bug (c))."""
    return any(not ((s | d | n) & 15) and (d & (PAGE_SIZE - 1)) + n > PAGE_SIZE
               for s, d, n in classic_chunks(src, dst, length))
