"""Helpers for the SEV layer tests: guests on the simulated platform and a raw ioctl caller."""

from __future__ import annotations

import base64
import hashlib
import hmac

from sevmon.memory.ram import RAM
from sevmon.model import SimulatedHost, SimulatedKvm
from sevmon.model.engine import MemoryController
from sevmon.model.firmware import SevFirmware
from sevmon.model.hostmem import HostMemory
from sevmon.sev import SevVm
from sevmon.sev.abi import KVM_MEMORY_ENCRYPT_OP, KvmSevCmd

MiB = 1 << 20
IMAGE_GPA = 0x100000


def new_vm(image: bytes | None = None, *, policy: int = 0, size: int = 16 * MiB, host: SimulatedHost | None = None,
           **kw) -> SevVm:
    ram = RAM(size)
    vm = SevVm(ram, policy=policy, kernel=SimulatedKvm(host, **kw))
    if image is not None:
        vm.launch([(IMAGE_GPA, image)])
    return vm


def raw_op(kvm: SimulatedKvm, cmd_id: int, struct=None, values: dict | None = None, *,
           sev_fd: int | None = None, error: int = 0) -> tuple[int, object, object]:
    """One KVM_MEMORY_ENCRYPT_OP with hand-built structs: (errno or 0, cmd back, data back)."""
    data = 0
    if struct is not None:
        data = kvm.alloc(struct.sizeof())
        kvm.write(data, struct.build(values or {}))
    cmd = kvm.alloc(KvmSevCmd.sizeof())
    kvm.write(cmd, KvmSevCmd.build(dict(id=cmd_id, data=data, error=error,
                                        sev_fd=kvm.sev_fd if sev_fd is None else sev_fd)))
    err = 0
    try:
        kvm.ioctl(kvm.vm_fd, KVM_MEMORY_ENCRYPT_OP, cmd)
    except OSError as e:
        err = e.errno
    out_cmd = KvmSevCmd.parse(kvm.read(cmd, KvmSevCmd.sizeof()))
    out = struct.parse(kvm.read(data, struct.sizeof())) if struct is not None else None
    kvm.free(cmd)
    if data:
        kvm.free(data)
    return err, out_cmd, out


def raw_firmware() -> tuple[SevFirmware, HostMemory]:
    """A PSP on bare DRAM, INIT + DF_FLUSH done, for raw (non-KVM) firmware callers."""
    from sevmon.sev.abi import FwCmd, SevDataInit

    dram = HostMemory()
    fw = SevFirmware(MemoryController(dram))
    assert fw.call(FwCmd.INIT, bytearray(SevDataInit.build({}))) == 0
    assert fw.call(FwCmd.DF_FLUSH) == 0
    return fw, dram


def measurement(d) -> tuple[dict, bytes, bytes]:
    """A daemon's ``query-sev`` and its launch measurement blob, split as a guest owner reads it: (MAC, MNONCE)."""
    from tests.conftest import qmp_connect
    q = qmp_connect(d)
    try:
        sev = q.cmd_obj({"execute": "query-sev"})["return"]
        blob = base64.b64decode(q.cmd_obj({"execute": "query-sev-launch-measure"})["return"]["data"])
    finally:
        q.close()
    return sev, blob[:32], blob[32:]


def owner_mac(sev: dict, digest: bytes, mnonce: bytes, tik: bytes = bytes(16)) -> bytes:
    """The measurement a guest owner expects for launch digest ``digest``: HMAC-SHA256(TIK, 0x04 || API || build ||
    policy || digest || MNONCE) (SEV API, LAUNCH_MEASURE)."""
    msg = bytes([0x04, sev["api-major"], sev["api-minor"], sev["build-id"]]) + sev["policy"].to_bytes(4, "little")
    return hmac.new(tik, msg + digest + mnonce, hashlib.sha256).digest()
