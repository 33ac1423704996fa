"""Target descriptions and register packets for x86 vCPUs, in QEMU's register order.

QEMU's x86 stub (``target/i386/gdbstub.c`` with ``gdb-xml/i386-64bit.xml`` and
``i386-32bit.xml``) numbers registers as: general registers, the instruction pointer,
eflags, the six selectors, ``fs_base``/``gs_base``/``k_gs_base``, ``cr0 cr2 cr3 cr4 cr8
efer``, ``st0``..``st7`` (80 bits) and the eight x87 control words, then ``xmm*`` and
``mxcsr``. The i386 layout has 32-bit fields and the hardware GPR order (eax ecx edx ebx esp
ebp esi edi); the x86-64 one has 64-bit fields and gdb's amd64 order (rax rbx rcx rdx rsi
rdi rbp rsp r8..r15). ``g``/``p`` packets follow the description, so one table drives
both the XML and the packets.

Values come from :class:`~sevmon.x86.cpu.CpuState`; what a memory image cannot know
(FPU, vector state) reads as QEMU's reset values unless the vCPU state carries it, as in
``info registers``. The control registers are plain integers (QEMU's flag types only
change how gdb pretty-prints them), unsigned: ``p/x $cr3`` prints the value the guest
loaded, C-bit included.
"""

from __future__ import annotations

from dataclasses import dataclass

from sevmon.x86.cpu import CpuState, canonical_reg


@dataclass(frozen=True, slots=True)
class Reg:
    name: str      # gdb's name
    bits: int
    type: str
    key: str       # CpuState key (canonical: "esp" is "rsp")
    group: str = ""

    def __post_init__(self):
        object.__setattr__(self, "key", canonical_reg(self.key))


_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
_FPU_CTRL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


def _layout(wide: bool) -> tuple[tuple[Reg, ...], tuple[Reg, ...]]:
    """(core registers, sse registers) for x86-64 (``wide``) or i386."""
    w = 64 if wide else 32
    it = "int64" if wide else "int32"
    if wide:
        gprs = [Reg(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", n)
                for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")]
        gprs += [Reg(f"r{i}", 64, "int64", f"r{i}") for i in range(8, 16)]
        ip = Reg("rip", 64, "code_ptr", "rip")
    else:
        gprs = [Reg(n, 32, "data_ptr" if n in ("esp", "ebp") else "int32", n)
                for n in ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")]
        ip = Reg("eip", 32, "code_ptr", "rip")
    core = [*gprs, ip, Reg("eflags", 32, "x86_eflags", "rflags")]
    core += [Reg(s, 32, "int32", s) for s in _SEGS]
    core += [Reg("fs_base", w, it, "fs_base"), Reg("gs_base", w, it, "gs_base"),
             Reg("k_gs_base", w, it, "kernel_gs_base")]
    core += [Reg(n, w, f"uint{w}", n) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
    core += [Reg(f"st{i}", 80, "i387_ext", f"fpr{i}") for i in range(8)]
    core += [Reg(n, 32, "int", n, "float") for n in _FPU_CTRL]
    sse = [Reg(f"xmm{i}", 128, "vec128", f"xmm{i}") for i in range(16 if wide else 8)]
    sse.append(Reg("mxcsr", 32, "int", "mxcsr", "vector"))
    return tuple(core), tuple(sse)


_EFLAGS = (("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
           ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
           ("VIP", 20), ("ID", 21))
_VEC128 = """  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
"""


class Target:
    """One architecture: its description (``target.xml``) and its register packets."""

    def __init__(self, wide: bool):
        self.wide = wide
        self.arch = "i386:x86-64" if wide else "i386"
        core, sse = _layout(wide)
        self.regs: tuple[Reg, ...] = core + sse
        self.xml = self._xml(core, sse)
        self._by_name = {r.name: i for i, r in enumerate(self.regs)}

    def _xml(self, core, sse) -> str:
        def reg_lines(regs, first):
            out = []
            for i, r in enumerate(regs, first):
                group = f' group="{r.group}"' if r.group else ""
                out.append(f'  <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{i}"{group}/>')
            return "\n".join(out)

        fields = "\n".join(f'    <field name="{n}" start="{b}" end="{b}"/>' for n, b in _EFLAGS)
        return (
            '<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n<target>\n'
            f"<architecture>{self.arch}</architecture>\n"
            '<feature name="org.gnu.gdb.i386.core">\n'
            f'  <flags id="x86_eflags" size="4">\n{fields}\n  </flags>\n'
            f"{reg_lines(core, 0)}\n</feature>\n"
            f'<feature name="org.gnu.gdb.i386.sse">\n{_VEC128}{reg_lines(sse, len(core))}\n</feature>\n'
            "</target>\n")

    # -- values ----------------------------------------------------------------------------
    @staticmethod
    def _value(cpu: CpuState, r: Reg) -> int:
        if r.key in cpu.regs:
            return cpu.get(r.key)
        return {"fctrl": 0x037F, "mxcsr": 0x1F80}.get(r.key, 0)

    def read(self, cpu: CpuState, n: int) -> bytes:
        r = self.regs[n]
        v = self._value(cpu, r)
        if r.key == "fstat":  # the top-of-stack field lives in fpstt, as QEMU assembles it
            v = (v & ~0x3800) | ((cpu.get("fpstt") & 7) << 11)
        nbytes = r.bits // 8
        return (v & ((1 << r.bits) - 1)).to_bytes(nbytes, "little")

    def read_all(self, cpu: CpuState) -> bytes:
        return b"".join(self.read(cpu, n) for n in range(len(self.regs)))

    def size(self, n: int) -> int:
        return self.regs[n].bits // 8

    def write(self, cpu: CpuState, n: int, data: bytes) -> None:
        r = self.regs[n]
        v = int.from_bytes(data, "little")
        if r.key == "fstat":
            cpu.set("fpstt", (v >> 11) & 7)
            v &= ~0x3800
        if not self.wide and r.bits == 32 and r.key in cpu.regs:
            v |= cpu.get(r.key) & ~0xFFFFFFFF   # a 32-bit view keeps the upper half
        cpu.set(r.key, v)

    def write_all(self, cpu: CpuState, data: bytes) -> int:
        """Registers from a ``G`` packet's bytes; returns how many were complete."""
        pos = n = 0
        for n, r in enumerate(self.regs):
            size = r.bits // 8
            if pos + size > len(data):
                return n
            self.write(cpu, n, data[pos:pos + size])
            pos += size
        return len(self.regs)


X86_64 = Target(wide=True)
I386 = Target(wide=False)


def target_for(cpu: CpuState) -> Target:
    """x86-64 for a long-mode vCPU (EFER.LMA), i386 for 32-bit and PAE ones. A vCPU whose registers are not
    available (SEV-ES; a raw image without CPU state) is x86-64: SEV-ES guests run in long mode, and the kernel
    tables sevmon walks for them are a 64-bit Linux's."""
    if cpu.unavailable is not None:
        return X86_64
    return X86_64 if cpu.long_mode else I386
