"""``sevmon check``: can this host (and this QEMU) be debugged live as an SEV guest? In the spirit of ``sevctl ok``.

Each item says what was found and, when it fails, the fix. Exit status 0 only when everything live SEV debugging
needs holds: /dev/kvm, kvm_amd's sev parameter, /dev/sev in a usable platform state, SEV in CPUID 0x8000001F, a
running kernel whose mirror VMs can issue debug commands (5.15, or a 5.14.10+ stable with the backport), memlock
headroom for the two pages each DBG chunk pins, and, given ``--qemu-pid``, ptrace rights over QEMU, its KVM VM fd,
a shareable RAM backend (memfd, /dev/shm or hugetlbfs file) and (with ``--qemu-qmp``) a plain SEV guest whose policy
allows debugging. The KVM_CAP_VM_COPY_ENC_CONTEXT_FROM probe and the memlock figure for ``serve --kvm`` are reported
for what they are. Everything here only reads: no VM is created.
"""

from __future__ import annotations

import ctypes
import errno as E
import json
import mmap
import os
import resource
import socket
import sys
from dataclasses import asdict, dataclass

from sevmon.debug.refusal import TYPE_REFUSALS, policy_forbids_debug, sev_type
from sevmon.sev.abi import (
    KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
    KVM_CHECK_EXTENSION,
    PAGE_SIZE,
    SEV_ISSUE_CMD,
    PlatformState,
    SevIssueCmd,
    SevUserCmd,
    SevUserDataStatus,
    fw_error_to_str,
)
from sevmon.sev.cpuid import LEAF, SevCpuid

OK, FAIL, SKIP = "ok", "fail", "skip"
SYS_pidfd_open, SYS_pidfd_getfd = 434, 438  # x86-64


@dataclass
class Item:
    name: str
    status: str           #: ok, fail, or skip (not applicable without --qemu-pid)
    detail: str
    fix: str = ""


@dataclass
class Paths:
    """Where the checks look (tests point them elsewhere)."""

    kvm: str = "/dev/kvm"
    sev: str = "/dev/sev"
    kvm_amd: str = "/sys/module/kvm_amd/parameters"
    cpuid: str = "/dev/cpu/0/cpuid"
    proc: str = "/proc"
    osrelease: str = "/proc/sys/kernel/osrelease"


def _ioctl(fd: int, request: int, arg: int) -> int:
    from sevmon.sev.linux import _libc_ioctl
    return _libc_ioctl(fd, request, arg)


def check_kvm(p: Paths) -> Item:
    try:
        os.close(os.open(p.kvm, os.O_RDWR))
    except OSError as e:
        fix = ("load KVM (modprobe kvm_amd)" if e.errno == E.ENOENT
               else "run as root or add the user to the kvm group")
        return Item("/dev/kvm", FAIL, f"{p.kvm}: {e.strerror}", fix)
    return Item("/dev/kvm", OK, f"{p.kvm} opens read-write")


def check_kvm_amd(p: Paths) -> list[Item]:
    if not os.path.isdir(p.kvm_amd):
        return [Item("kvm_amd sev", FAIL, "the kvm_amd module is not loaded",
                     "modprobe kvm_amd sev=1 (an AMD host with SEV enabled in the BIOS)"),
                Item("kvm_amd sev_es", SKIP, "the kvm_amd module is not loaded (SEV-ES is not needed)")]
    out = []
    for param in ("sev", "sev_es"):
        try:
            value = open(os.path.join(p.kvm_amd, param)).read().strip()
        except OSError:
            out.append(Item(f"kvm_amd {param}", FAIL, "parameter absent (kernel built without SEV support)",
                            "a kernel with CONFIG_KVM_AMD_SEV=y"))
            continue
        on = value in ("Y", "1")
        out.append(Item(f"kvm_amd {param}", OK if on else FAIL, f"{param}={value}",
                        "" if on else f"modprobe -r kvm_amd; modprobe kvm_amd {param}=1 (and enable it in the BIOS)"))
    out[1].status = OK if out[1].status == OK else SKIP  # SEV-ES is not needed to debug a plain SEV guest
    return out


def check_dev_sev(p: Paths) -> Item:
    if not os.path.exists(p.sev):
        return Item("/dev/sev", FAIL, f"{p.sev} does not exist",
                    "load ccp (modprobe ccp) on an AMD EPYC host with SEV enabled in the BIOS")
    try:
        fd = os.open(p.sev, os.O_RDWR)
    except OSError as e:
        return Item("/dev/sev", FAIL, f"{p.sev}: {e.strerror}", "run as root or grant access to /dev/sev")
    buf = mmap.mmap(-1, PAGE_SIZE)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        data = base + 64
        buf[0:SevIssueCmd.sizeof()] = SevIssueCmd.build(dict(cmd=SevUserCmd.PLATFORM_STATUS, data=data))
        try:
            _ioctl(fd, SEV_ISSUE_CMD, base)
        except OSError as e:
            fw = SevIssueCmd.parse(buf[0:SevIssueCmd.sizeof()]).error
            why = f"firmware: {fw_error_to_str(fw)}" if e.errno == E.EIO and fw else e.strerror
            return Item("/dev/sev", FAIL, f"PLATFORM_STATUS failed: {why}", "check dmesg for ccp/PSP errors")
        st = SevUserDataStatus.parse(buf[64:64 + SevUserDataStatus.sizeof()])
    finally:
        os.close(fd)
    state = PlatformState(st.state).name if st.state in PlatformState._value2member_map_ else str(st.state)
    detail = f"platform {state}, API {st.api_major}.{st.api_minor}, build {st.build}, {st.guest_count} guests"
    return Item("/dev/sev", OK, detail)


def check_cpuid(p: Paths) -> Item:
    try:
        fd = os.open(p.cpuid, os.O_RDONLY)
        try:
            regs = os.pread(fd, 16, LEAF)
        finally:
            os.close(fd)
    except OSError as e:
        return Item("CPUID 0x8000001F", FAIL,
                    f"{p.cpuid}: {e.strerror}; Python cannot execute the cpuid instruction itself",
                    "modprobe cpuid (and run as root)")
    c = SevCpuid(*(int.from_bytes(regs[i:i + 4], "little") for i in range(0, 16, 4)))
    if not c.sev:
        return Item("CPUID 0x8000001F", FAIL, f"SEV not reported (eax={c.eax:#x} ebx={c.ebx:#x})",
                    "an AMD EPYC host with SME/SEV enabled in the BIOS")
    return Item("CPUID 0x8000001F", OK,
                f"SEV{', SEV-ES' if c.sev_es else ''}; C-bit {c.cbitpos}, reduced phys bits {c.reduced_phys_bits}, "
                f"ASIDs {c.min_sev_asid}..{c.num_encrypted_guests}")


KERNEL_FIX = ("Linux 5.15 or later, or a 5.14 stable from 5.14.10 (a distribution kernel with an older number may "
              "carry the backport: its vendor can say)")


def kernel_version(release: str) -> tuple[int, int, int] | None:
    """``5.14.10-200.fc34.x86_64`` -> (5, 14, 10); None if it does not start with a version."""
    import re

    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def check_kernel(p: Paths) -> Item:
    """What the running kernel's mirror VMs can do. KVM_CAP_VM_COPY_ENC_CONTEXT_FROM came in 5.13, but until the
    mirror's command allow-list and the copy of the source's handle and /dev/sev fd (mainline 5.15, backported to
    5.14.10 stable) a mirror copied only the ASID, and every command on it fails with EINVAL."""
    name = "running kernel"
    try:
        release = open(p.osrelease).read().strip()
    except OSError as e:
        return Item(name, FAIL, f"{p.osrelease}: {e.strerror}", KERNEL_FIX)
    v = kernel_version(release)
    if v is None:
        return Item(name, FAIL, f"Linux {release}: not a version sevmon can read", KERNEL_FIX)
    if v >= (5, 15):
        return Item(name, OK, f"Linux {release}: mirror VMs can issue debug commands (5.15 and later)")
    if v[:2] == (5, 14) and v[2] >= 10:
        return Item(name, OK, f"Linux {release}: mirror VMs can issue debug commands (5.14.10+ stable carries "
                              "5.15's fixes)")
    if v >= (5, 13):
        return Item(name, FAIL, f"Linux {release}: mirror VMs exist (5.13) but copy only the ASID, not the guest's "
                                "handle and /dev/sev fd: every command on a mirror fails with EINVAL", KERNEL_FIX)
    return Item(name, FAIL, f"Linux {release}: no mirror VMs before 5.13", KERNEL_FIX)


def check_mirror_cap(p: Paths) -> Item:
    name = "KVM_CAP_VM_COPY_ENC_CONTEXT_FROM"
    try:
        fd = os.open(p.kvm, os.O_RDWR)
    except OSError as e:
        return Item(name, FAIL, f"{p.kvm}: {e.strerror}", "see /dev/kvm")
    try:
        r = _ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_VM_COPY_ENC_CONTEXT_FROM)
    except OSError as e:
        r, why = 0, f" ({e.strerror})"
    else:
        why = ""
    finally:
        os.close(fd)
    if r:  # x86 KVM answers for every vendor: a fact about the kernel's age, not about SEV
        return Item(name, OK, f"KVM_CHECK_EXTENSION(197) = {r}: this kernel knows mirror VMs (5.13 and later); "
                              "every x86 host answers so, Intel too: it says nothing about SEV")
    return Item(name, FAIL, f"KVM_CHECK_EXTENSION(197) = 0{why}: this kernel has no mirror VMs", KERNEL_FIX)


def check_memlock() -> Item:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    need = 2 * PAGE_SIZE  # each DBG chunk pins one source and one destination page
    if soft == resource.RLIM_INFINITY:
        return Item("memlock limit", OK, "unlimited")
    if soft >= need:
        return Item("memlock limit", OK, f"{soft // 1024} KiB (each DBG chunk pins 2 pages)")
    return Item("memlock limit", FAIL, f"{soft} bytes: below the 2 pages each DBG chunk pins",
                "ulimit -l 64 (or CAP_IPC_LOCK)")


CAP_IPC_LOCK = 14


def _has_cap_ipc_lock(p: Paths) -> bool:
    try:
        for line in open(os.path.join(p.proc, "self", "status")):
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return False


def check_kvm_memlock(p: Paths) -> Item:
    """``serve --kvm`` registers all of the image's RAM with KVM (REG_REGION pins it) on top of the 2 pages per DBG
    chunk: how much RAM that allows under this process's limit (the kernel skips the limit with CAP_IPC_LOCK).
    Reported, not judged: live debugging through a mirror does not need it, and the image size is not known here."""
    name = "memlock for --kvm"
    if _has_cap_ipc_lock(p):
        return Item(name, OK, "CAP_IPC_LOCK held: serve --kvm may pin all of an image's RAM whatever the limit")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return Item(name, OK, "unlimited: serve --kvm may pin all of an image's RAM")
    room = max(0, soft - 2 * PAGE_SIZE)
    return Item(name, OK, f"serve --kvm pins all of an image's RAM: under this limit ({soft // 1024} KiB, no "
                          f"CAP_IPC_LOCK) images of up to {room >> 20} MiB of RAM fit; raise it with ulimit -l")


def _fd_links(p: Paths, pid: int) -> dict[int, str]:
    d = os.path.join(p.proc, str(pid), "fd")
    out = {}
    for name in os.listdir(d):
        try:
            out[int(name)] = os.readlink(os.path.join(d, name))
        except OSError:
            pass
    return out


def check_qemu(p: Paths, pid: int | None, qmp: str | None) -> list[Item]:
    if pid is None:
        why = "no --qemu-pid given"
        return [Item(n, SKIP, why) for n in ("QEMU ptrace rights", "QEMU VM fd", "QEMU RAM backend",
                                              "QEMU guest type", "QEMU guest policy")]
    items = []
    try:
        links = _fd_links(p, pid)
    except FileNotFoundError:
        return [Item("QEMU ptrace rights", FAIL, f"no process {pid}", "give the PID of the running QEMU")]
    except PermissionError:
        return [Item("QEMU ptrace rights", FAIL, f"cannot list /proc/{pid}/fd: permission denied",
                     "run sevmon as QEMU's user or as root (CAP_SYS_PTRACE); check kernel.yama.ptrace_scope")]
    vm_fds = [fd for fd, link in links.items() if link == "anon_inode:kvm-vm"]
    items.append(_ptrace_item(pid, vm_fds[0] if vm_fds else None))
    items.append(Item("QEMU VM fd", OK, f"fd {vm_fds[0]} is anon_inode:kvm-vm") if vm_fds else
                 Item("QEMU VM fd", FAIL, "no anon_inode:kvm-vm fd: QEMU is not running a KVM guest",
                      "run QEMU with -accel kvm and an sev-guest object"))
    items.append(_backend_item(p, pid, links))
    items.extend(_guest_items(qmp))
    return items


def _ptrace_item(pid: int, vm_fd: int | None) -> Item:
    name = "QEMU ptrace rights"
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(SYS_pidfd_open, pid, 0)
    if pidfd < 0:
        err = ctypes.get_errno()
        return Item(name, FAIL, f"pidfd_open({pid}): {os.strerror(err)}", "Linux >= 5.3; the PID of QEMU")
    try:
        target = vm_fd if vm_fd is not None else 0
        fd = libc.syscall(SYS_pidfd_getfd, pidfd, target, 0)
        if fd < 0:
            err = ctypes.get_errno()
            if err == E.EPERM:
                return Item(name, FAIL, f"pidfd_getfd: {os.strerror(err)}",
                            "run sevmon as QEMU's user or as root (CAP_SYS_PTRACE); check kernel.yama.ptrace_scope")
            if err != E.EBADF:
                return Item(name, FAIL, f"pidfd_getfd: {os.strerror(err)}", "Linux >= 5.6 for pidfd_getfd")
        else:
            os.close(fd)
    finally:
        os.close(pidfd)
    return Item(name, OK, f"pidfd_getfd on {pid} allowed")


def _backend_item(p: Paths, pid: int, links: dict[int, str]) -> Item:
    name = "QEMU RAM backend"
    memfds = [link for link in links.values() if link.startswith("/memfd:")]
    shm = []
    shareable = _shareable_dirs(p)
    try:
        for line in open(os.path.join(p.proc, str(pid), "maps")):
            f = line.split()
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            what = " ".join(f[5:])
            # a file backend anywhere but a device node: /dev/shm (tmpfs) and hugetlbfs mounts are files too
            if len(f) >= 6 and f[1][3] == "s" and hi - lo >= 1 << 20 and (
                    not what.startswith("/dev/") or what.startswith(shareable)):
                shm.append((hi - lo, what))
    except OSError as e:
        return Item(name, FAIL, f"/proc/{pid}/maps: {e.strerror}", "ptrace rights over QEMU")
    if shm:
        size, what = max(shm)
        return Item(name, OK, f"shared mapping of {size >> 20} MiB: {what}")
    if memfds:
        return Item(name, FAIL, f"{memfds[0]} is open but not mapped shared", "share=on on the memory backend")
    return Item(name, FAIL, "guest RAM is private anonymous memory: no other process can map it",
                "-object memory-backend-memfd,id=ram0,size=SIZE,share=on -machine memory-backend=ram0")


def _shareable_dirs(p: Paths) -> tuple[str, ...]:
    """Directories under /dev that hold files, not devices: /dev/shm and every hugetlbfs mount point."""
    dirs = ["/dev/shm/", "/dev/hugepages/"]
    try:
        for line in open(os.path.join(p.proc, "self", "mounts")):
            f = line.split()
            if len(f) >= 3 and f[2] in ("hugetlbfs", "tmpfs") and f[1].startswith("/dev/"):
                dirs.append(f[1].rstrip("/") + "/")
    except OSError:
        pass
    return tuple(dirs)


def _guest_items(qmp: str | None) -> list[Item]:
    """The guest's SEV type (query-sev's sev-type where QEMU has it, else the policy's ES bit) and its policy."""
    if qmp is None:
        why = "unknown: needs --qemu-qmp SOCKET to ask QEMU (query-sev)"
        return [Item("QEMU guest type", FAIL, why, "pass QEMU's QMP socket with --qemu-qmp"), _policy_item(None)]
    try:
        info = qmp_query(qmp, "query-sev")
    except (OSError, ValueError) as e:
        return [Item("QEMU guest type", FAIL, f"query-sev on {qmp}: {e}", "a QMP socket of the running QEMU"),
                Item("QEMU guest policy", SKIP, "see QEMU guest type")]
    ret = info.get("return") or {}
    if "error" in info or not ret.get("enabled", True):
        return [_type_item(None), _policy_item(qmp, info)]
    t = sev_type(ret)
    return [_type_item(t, ret), _policy_item(qmp, info) if t != "sev-snp" else
            Item("QEMU guest policy", SKIP, f"snp-policy {ret.get('snp-policy', 0):#x}: an SNP guest, see "
                                            "QEMU guest type")]


def _type_item(t: str | None, ret: dict | None = None) -> Item:
    name = "QEMU guest type"
    if t is None:
        return Item(name, FAIL, "not an SEV guest", "QEMU must run an sev-guest "
                                                    "(-machine confidential-guest-support=sev0)")
    source = f"sev-type {t}" if "sev-type" in (ret or {}) else f"policy {ret.get('policy', 0):#x}"
    if t == "sev-snp":
        return Item(name, FAIL, f"SEV-SNP ({source}): {TYPE_REFUSALS['sev-snp']}",
                    "a kernel patched to allow debugging SNP guests, or relaunch the guest as plain SEV")
    if t == "sev-es":
        return Item(name, FAIL, f"SEV-ES ({source}, ES bit set): its registers are in the encrypted VMSA, so "
                                "QEMU has no CR3 for sevmon to walk the page tables from; sevmon debugs plain SEV "
                                "guests", "relaunch with the ES bit (0x4) clear in sev-guest,policy")
    return Item(name, OK, f"SEV ({source}{', no ES bit' if 'sev-type' not in ret else ''})")


def _policy_item(qmp: str | None, info: dict | None = None) -> Item:
    name = "QEMU guest policy"
    if qmp is None:
        return Item(name, FAIL, "unknown: needs --qemu-qmp SOCKET to ask QEMU (query-sev)",
                    "pass QEMU's QMP socket with --qemu-qmp")
    try:
        info = info if info is not None else qmp_query(qmp, "query-sev")
    except (OSError, ValueError) as e:
        return Item(name, FAIL, f"query-sev on {qmp}: {e}", "a QMP socket of the running QEMU")
    if "error" in info:
        return Item(name, FAIL, f"query-sev: {info['error'].get('desc', info['error'])}",
                    "QEMU must run an sev-guest (-machine confidential-guest-support=sev0)")
    if not info["return"].get("enabled", True):
        return Item(name, FAIL, "query-sev: SEV is not enabled for this guest",
                    "QEMU must run an sev-guest (-machine confidential-guest-support=sev0)")
    policy = info["return"].get("policy", 0)
    if policy_forbids_debug(policy):
        return Item(name, FAIL, f"policy {policy:#x}: NODBG set, the firmware refuses DBG_DECRYPT",
                    "relaunch with sev-guest,policy=0x0 (debug allowed); QEMU's default 0x1 forbids it")
    return Item(name, OK, f"policy {policy:#x}: debugging allowed")


def qmp_query(path: str, command: str) -> dict:
    """One QMP command on a UNIX socket (greeting, qmp_capabilities, command); its reply, events skipped."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rwb")

        def reply() -> dict:
            while True:
                line = f.readline()
                if not line:
                    raise ValueError("QMP connection closed")
                msg = json.loads(line)
                if "event" not in msg:
                    return msg
        greeting = reply()
        if "QMP" not in greeting:
            raise ValueError("not a QMP server")
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\r\n")
            f.flush()
            r = reply()
        return r


def run_checks(qemu_pid: int | None = None, qemu_qmp: str | None = None, paths: Paths | None = None) -> list[Item]:
    p = paths or Paths()
    return [check_kvm(p), *check_kvm_amd(p), check_dev_sev(p), check_cpuid(p), check_kernel(p), check_mirror_cap(p),
            check_memlock(), check_kvm_memlock(p), *check_qemu(p, qemu_pid, qemu_qmp)]


def verdict(items: list[Item]) -> str:
    """One sentence for the whole."""
    by = {i.name: i.status for i in items}
    if all(i.status != FAIL for i in items):
        return "ready: live SEV debugging can work on this host"
    if by["/dev/kvm"] == FAIL:
        return "not ready: KVM is not available"
    if by["/dev/sev"] == FAIL and by["CPUID 0x8000001F"] == FAIL:
        return "not ready: KVM is present but SEV is not (no /dev/sev, CPUID reports no SEV)"
    failed = ", ".join(i.name for i in items if i.status == FAIL)
    return f"not ready: {failed}"


def main(qemu_pid: int | None, qemu_qmp: str | None, as_json: bool, out=sys.stdout) -> int:
    items = run_checks(qemu_pid, qemu_qmp)
    ok = all(i.status != FAIL for i in items)
    if as_json:
        out.write(json.dumps({"ready": ok, "verdict": verdict(items), "checks": [asdict(i) for i in items]},
                             indent=1) + "\n")
    else:
        w = max(len(i.name) for i in items)
        for i in items:
            out.write(f"{i.name:<{w}}  {i.status.upper():<4}  {i.detail}\n")
            if i.status == FAIL and i.fix:
                out.write(f"{'':<{w}}        fix: {i.fix}\n")
        out.write(verdict(items) + "\n")
    return 0 if ok else 1
