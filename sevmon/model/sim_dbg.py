"""DBG_DECRYPT / DBG_ENCRYPT as Linux's classic ``sev_dbg_crypt`` does them (sev-api.md §2.1).

The range is split only at *source* page boundaries, one PSP command per chunk; unaligned decrypts go through a
bounce page; unaligned encrypts read-modify-write the destination (two PSP commands), with bug (b): the RMW
re-encrypts ``round_up(len, 16)`` bytes from the rounded-down destination. A mixin of
:class:`~sevmon.model.sim_kvm.SimulatedKvm`, which provides ``mem``, ``host``, ``stats``, ``_faults``, ``_handle``,
``_data`` and ``_require_sev``.
"""

from __future__ import annotations

import errno as E

from construct import Container

from sevmon.sev.abi import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, KvmSevDbg
from sevmon.sev.dbgsplit import classic_overruns

from .sim_host import KernelError

_U64 = (1 << 64) - 1


class DebugCrypt:
    """The DBG ops of one VM, and the PSP calls they make."""

    def _fw_dbg(self, cmd: Container, *, encrypt: bool, src: int, dst: int, length: int, calls: int = 1) -> None:
        """``calls`` back-to-back DBG commands, one per source-page chunk of the range."""
        base = self.stats.firmware_calls
        hits = [k for k in self._faults if base < k <= base + calls] if self._faults else ()
        if hits:
            k = min(hits)
            done = k - base - 1
            if done:  # the commands before the injected failure run normally
                prefix = min((src & PAGE_MASK) + done * PAGE_SIZE - src, length)
                self._fw_dbg(cmd, encrypt=encrypt, src=src, dst=dst, length=prefix, calls=done)
            self.stats.firmware_calls += 1
            self.host.psp_count_failed()
            cmd.error = self._faults.pop(k)
            raise KernelError(E.EIO)
        status = self.host.psp_dbg_crypt(encrypt=encrypt, handle=self._handle, src=src, dst=dst,
                                         length=length, commands=calls)
        cmd.error = int(status)
        if status:  # the first of them fails; the loop stops there
            self.stats.firmware_calls += 1
            raise KernelError(E.EIO)
        self.stats.firmware_calls += calls
        if encrypt:
            self.stats.bytes_encrypted += length
        else:
            self.stats.bytes_decrypted += length

    # -- DBG_DECRYPT / DBG_ENCRYPT: sev_dbg_crypt, classic ----------------------------------------
    def _op_dbg(self, cmd: Container, dec: bool) -> int:
        self._require_sev()
        if self._fd is not None and not self._stored_sev_fd_ok():
            raise KernelError(E.EBADF)  # sev_issue_cmd(kvm, ...): the stored /dev/sev fd number, in this process
        debug = self._data(cmd, KvmSevDbg)
        if not debug.len or debug.src_uaddr + debug.len > _U64:
            raise KernelError(E.EINVAL)
        if not debug.dst_uaddr:
            raise KernelError(E.EINVAL)
        vaddr, size, dst = debug.src_uaddr, debug.len, debug.dst_uaddr
        # the classic kernel's page overflow: the PSP writes on past the pinned destination page (here into the
        # next host-physical page, as there); recorded so that a test can see the host memory it would corrupt
        self.host.dbg_overruns += classic_overruns(vaddr, dst, size, encrypt=not dec)
        if not ((vaddr | dst | size) & 15):
            # Everything aligned: every chunk is one DBG command straight between the pinned
            # pages. When both ranges are pinnable and physically contiguous, issue them as one
            # run (still one command per source page) instead of walking page by page.
            s = self.mem.contiguous(vaddr, size)
            d = self.mem.contiguous(dst, size) if s is not None else None
            if d is not None and (s + size <= d or d + size <= s):  # disjoint: order cannot matter
                self.mem.charge(2)
                calls = ((vaddr + size - 1) >> PAGE_SHIFT) - (vaddr >> PAGE_SHIFT) + 1
                self._fw_dbg(cmd, encrypt=not dec, src=s, dst=d, length=size, calls=calls)
                return 0
        end = vaddr + size
        run = None  # [src_pa, dst_pa, length, chunks]: adjacent aligned chunks not yet issued
        while vaddr < end:
            src_p = self.mem.pin_page(vaddr & PAGE_MASK)
            dst_p = self.mem.pin_page(dst & PAGE_MASK) if src_p is not None else None
            if src_p is None or dst_p is None:
                self._flush(cmd, run, not dec)
                raise KernelError(E.ENOMEM)
            s_off, d_off = vaddr & (PAGE_SIZE - 1), dst & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - s_off, size)
            spa, dpa = src_p + s_off, dst_p + d_off
            if not ((spa | dpa | n) & 15):  # one DBG command straight between the two pages
                if (run is not None and run[0] + run[2] == spa and run[1] + run[2] == dpa
                        and (spa + n <= run[1] or dpa + n <= run[0])):  # adjacent, and no overlap
                    run[2] += n
                    run[3] += 1
                else:
                    self._flush(cmd, run, not dec)
                    run = [spa, dpa, n, 1]
            else:
                self._flush(cmd, run, not dec)
                run = None
                if dec:
                    self._dbg_decrypt_user(cmd, spa, dst, n)
                else:
                    self._dbg_encrypt_user(cmd, spa, vaddr, dpa, dst, n)
            vaddr += n
            dst += n
            size -= n
        self._flush(cmd, run, not dec)
        return 0

    def _flush(self, cmd: Container, run: list | None, encrypt: bool) -> None:
        if run is not None:
            self._fw_dbg(cmd, encrypt=encrypt, src=run[0], dst=run[1], length=run[2], calls=run[3])

    def _dbg_decrypt_user(self, cmd: Container, paddr: int, dst_uaddr: int, size: int) -> None:
        """Unaligned decrypt: DBG_DECRYPT the covering 16-byte blocks into a bounce page."""
        tpage, tbuf = self.host.kalloc(PAGE_SIZE)
        try:
            offset = paddr & 15
            self._fw_dbg(cmd, encrypt=False, src=paddr - offset, dst=tpage,
                         length=(size + offset + 15) & ~15)
            self.mem.uwrite(dst_uaddr, bytes(tbuf[offset:offset + size]))
        finally:
            self.host.kfree(tpage)

    def _dbg_encrypt_user(self, cmd: Container, paddr: int, vaddr: int, dst_paddr: int,
                          dst_vaddr: int, size: int) -> None:
        """Unaligned encrypt: bounce the source, and read-modify-write the destination."""
        src_tpage = dst_tpage = None
        try:
            length = size
            if vaddr & 15:
                src_tpage, sbuf = self.host.kalloc(PAGE_SIZE)
                sbuf[:size] = self.mem.uread(vaddr, size)
                paddr = src_tpage
            if dst_vaddr & 15 or size & 15:
                dst_tpage, dbuf = self.host.kalloc(PAGE_SIZE)
                offset = dst_paddr & 15
                self._fw_dbg(cmd, encrypt=False, src=dst_paddr - offset, dst=dst_tpage,
                             length=(size + offset + 15) & ~15)
                src_bytes = sbuf[:size] if src_tpage is not None else self.mem.uread(vaddr, size)
                dbuf[offset:offset + size] = src_bytes
                paddr = dst_tpage
                dst_paddr -= offset
                length = (size + 15) & ~15  # classic bug (b): ignores the destination offset
            self._fw_dbg(cmd, encrypt=True, src=paddr, dst=dst_paddr, length=length)
        finally:
            for hpa in (src_tpage, dst_tpage):
                if hpa is not None:
                    self.host.kfree(hpa)
