"""The simulated ``/dev/sev`` ioctl (the ccp driver's ``sev_ioctl``): PLATFORM_STATUS, PDH_CERT_EXPORT, GET_ID2.

A mixin of :class:`~sevmon.model.sim_kvm.SimulatedKvm`, which provides ``mem`` (the process's memory), ``host`` and
``_fw`` (one counted PSP command).
"""

from __future__ import annotations

import errno as E

from construct import Container

from sevmon.sev.abi import (
    PAGE_SIZE,
    SEV_FW_BLOB_MAX_SIZE,
    FwCmd,
    PlatformState,
    SevDataGetId,
    SevDataInit,
    SevDataPdhCertExport,
    SevIssueCmd,
    SevUserCmd,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataStatus,
)

from .sim_host import KernelError


class SevDeviceIoctls:
    """``SEV_ISSUE_CMD`` on the process's ``/dev/sev`` fd."""

    # -- /dev/sev --------------------------------------------------------------------------------
    def _sev_dev_ioctl(self, arg: int) -> int:
        """``sev_ioctl`` of the ccp driver: PLATFORM_STATUS, PDH_CERT_EXPORT and GET_ID2."""
        try:
            inp = SevIssueCmd.parse(self.mem.uread(arg, SevIssueCmd.sizeof()))
        except KernelError:
            return -E.EFAULT
        if inp.cmd > SevUserCmd.MAX:
            return -E.EINVAL
        handler = {SevUserCmd.PLATFORM_STATUS: self._dev_platform_status,
                   SevUserCmd.PDH_CERT_EXPORT: self._dev_pdh_cert_export,
                   SevUserCmd.GET_ID2: self._dev_get_id2}.get(inp.cmd)
        if handler is None:
            return -E.EINVAL  # the other /dev/sev commands are not modelled
        try:
            r = handler(inp)
        except KernelError as e:
            r = -e.code
        try:
            self.mem.uwrite(arg, SevIssueCmd.build(inp))
        except KernelError:
            r = -E.EFAULT
        return r

    def _dev_platform_status(self, inp: Container) -> int:
        buf = bytearray(SevUserDataStatus.sizeof())
        r = self._fw(FwCmd.PLATFORM_STATUS, buf, inp)
        if not r:
            self.mem.uwrite(inp.data, bytes(buf))
        return r

    def _dev_platform_init(self, inp: Container) -> None:
        """``__sev_platform_init_locked`` when the driver finds the platform UNINIT."""
        if self.host.platform_state == PlatformState.UNINIT:
            if self._fw(FwCmd.INIT, bytearray(SevDataInit.build({})), inp) or \
                    self._fw(FwCmd.DF_FLUSH, bytearray(), inp):
                raise KernelError(E.EIO)

    def _dev_pdh_cert_export(self, inp: Container) -> int:
        p = SevUserDataPdhCertExport.parse(self.mem.uread(inp.data, SevUserDataPdhCertExport.sizeof()))
        blobs = []
        try:
            pdh = chain = 0
            if p.pdh_cert_address and p.pdh_cert_len and p.cert_chain_address:  # else: a length query
                if p.pdh_cert_len > SEV_FW_BLOB_MAX_SIZE or p.cert_chain_len > SEV_FW_BLOB_MAX_SIZE:
                    raise KernelError(E.EFAULT)
                pdh = self.host.kalloc(p.pdh_cert_len)[0]
                blobs.append(pdh)
                chain = self.host.kalloc(p.cert_chain_len)[0]
                blobs.append(chain)
            self._dev_platform_init(inp)
            buf = bytearray(SevDataPdhCertExport.build(dict(
                pdh_cert_address=pdh, pdh_cert_len=p.pdh_cert_len if pdh else 0,
                cert_chain_address=chain, cert_chain_len=p.cert_chain_len if chain else 0)))
            r = self._fw(FwCmd.PDH_CERT_EXPORT, buf, inp)
            out = SevDataPdhCertExport.parse(bytes(buf))
            user = dict(p, pdh_cert_len=out.pdh_cert_len, cert_chain_len=out.cert_chain_len)
            self.mem.uwrite(inp.data, SevUserDataPdhCertExport.build(user))
            if pdh:
                self.mem.uwrite(p.pdh_cert_address, self.host.dram.read(pdh, out.pdh_cert_len))
                self.mem.uwrite(p.cert_chain_address, self.host.dram.read(chain, out.cert_chain_len))
            return r
        finally:
            for hpa in blobs:
                self.host.kfree(hpa)

    def _dev_get_id2(self, inp: Container) -> int:
        p = SevUserDataGetId2.parse(self.mem.uread(inp.data, SevUserDataGetId2.sizeof()))
        blob = 0
        if p.address and p.length:
            if p.length > PAGE_SIZE:
                raise KernelError(E.EINVAL)
            blob = self.host.kalloc(p.length)[0]
        try:
            buf = bytearray(SevDataGetId.build(dict(address=blob, len=p.length if blob else 0)))
            r = self._fw(FwCmd.GET_ID, buf, inp)
            n = SevDataGetId.parse(bytes(buf)).len
            self.mem.uwrite(inp.data, SevUserDataGetId2.build(dict(p, length=n)))
            if blob and not r:
                self.mem.uwrite(p.address, self.host.dram.read(blob, n))
            return r
        finally:
            if blob:
                self.host.kfree(blob)
