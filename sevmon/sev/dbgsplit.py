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


def classic_overruns(src: int, dst: int, length: int, *, encrypt: bool) -> list[tuple[int, int]]:
    """``(dst, n)`` for each chunk whose PSP command writes ``n`` bytes past the single destination page the classic
    kernel pinned for it (starting at user address ``dst``): host memory that is not the destination.

    Two ways, both from ``__sev_dbg_{de,en}crypt_user``: an aligned chunk cut only at the *source* page boundary with
    its destination at a larger page offset (bug (c), either direction), and the encrypt read-modify-write, which
    re-encrypts ``round_up(n, 16)`` bytes from the rounded-down destination. An unaligned decrypt goes through a
    bounce page and ``copy_to_user``, which cannot overrun.
    """
    out = []
    for s, d, n in classic_chunks(src, dst, length):
        d_off = d & (PAGE_SIZE - 1)
        if not ((s | d | n) & 15) or (encrypt and not ((d | n) & 15)):
            end = d_off + n
        elif encrypt:  # read-modify-write: DBG_ENCRYPT(round_down(dst, 16), round_up(n, 16))
            end = (d_off & ~15) + ((n + 15) & ~15)
        else:
            continue
        if end > PAGE_SIZE:
            out.append((d, end - PAGE_SIZE))
    return out


def crosses_destination_page(src: int, dst: int, length: int) -> bool:
    """True when some 16-aligned chunk's destination crosses a page: the classic kernel would make the PSP
    write past the single pinned destination page (bug (c))."""
    return any(not ((s | d | n) & 15) and (d & (PAGE_SIZE - 1)) + n > PAGE_SIZE
               for s, d, n in classic_chunks(src, dst, length))
