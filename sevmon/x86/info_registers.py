"""``info registers`` exactly as qemu-system-x86_64 7.2 prints it (``hmp_info_registers``
then ``x86_cpu_dump_state(..., CPU_DUMP_FPU)``; facts re-derived, not copied).

The text uses ``"\\n"`` line ends, as QEMU's printf calls do; the monitor layer turns them
into ``"\\r\\n"`` (QEMU's ``monitor_puts``), which is what ``human-monitor-command``
returns. It starts with an empty line and ``CPU#<index>``.

What decides the layout (QEMU's hflags, derived from the registers):

* ``HF_LMA`` = EFER.LMA; ``HF_CS64`` = LMA and CS.L (``cs_flags`` bit 21); ``HF_PE`` =
  CR0.PE. CS64 picks the 64-bit GPR/RIP lines and 16-digit segment bases; LMA picks the
  64-bit GDT/IDT/CR lines and the 64-bit system-segment type names.
* Segment lines print ``flags & 0x00ffff00``; ``DPL=..`` and the type are printed only
  with CR0.PE and the segment present.
* CPL is SS.DPL in protected mode (3 in virtual-8086 mode, 0 in real mode), or ``cpl``.

Lines sevmon can reproduce from a core's notes + ``cpu.json``: the GPR lines, the
RIP/EIP + flags line (``II=0 A20=1 SMM=0`` are defaults; ``HLT`` is ``CpuState.halted``),
ES..TR, GDT, IDT, CR0/CR2/CR3/CR4, EFER.

Lines that come from *defaults* unless the optional registers are set in the
``CpuState`` (QEMU's notes do not carry them):

* ``DR0``..``DR3`` = 0, ``DR6`` = 0xffff0ff0, ``DR7`` = 0x400 (keys ``dr0``..``dr7``);
* ``FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80`` (keys ``fcw``, ``fsw``, ``fpstt``,
  ``ftw``, ``mxcsr``); ``FPR0..7`` = 0 (keys ``fpr0``..``fpr7``, 80-bit values);
* the vector registers = 0 (keys ``xmm0``.., the full ZMM/YMM/XMM value as an int;
  ``opmask0``..). Which block is printed follows XCR0 (key ``xcr0``): AVX-512 state ->
  ``Opmask``/``ZMM`` lines, AVX -> ``YMM`` lines, else ``XMM`` lines. Without ``xcr0``
  sevmon assumes 0x7 (x87|SSE|AVX, what QEMU 7.2 TCG ``-cpu max`` and Linux use) when
  CR4.OSXSAVE is set, else 0x1 (QEMU's reset value).

Against the fixtures every line matches except the vector registers that hold non-zero
data in the real guest (and, for the 32-bit guest, FPR6), which a memory image cannot know.
"""

from __future__ import annotations

from sevmon.x86.cpu import EFER_LMA, CpuState

DESC_A = 1 << 8
DESC_W = DESC_R = 1 << 9
DESC_E = DESC_C = 1 << 10
DESC_CS = 1 << 11
DESC_S = 1 << 12
DESC_DPL_SHIFT = 13
DESC_P = 1 << 15
DESC_L = 1 << 21
DESC_B = 1 << 22

CR4_OSXSAVE = 1 << 18
EFLAGS_VM = 1 << 17
EFLAGS_DF = 1 << 10
CC_O, CC_S, CC_Z, CC_A, CC_P, CC_C = 0x800, 0x80, 0x40, 0x10, 0x04, 0x01

XSTATE_SSE = 1 << 1
XSTATE_YMM = 1 << 2
XSTATE_OPMASK = 1 << 5
XSTATE_ZMM_HI256 = 1 << 6
XSTATE_HI16_ZMM = 1 << 7

_SYS_TYPES = (
    ("Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16",
     "TrapGate16", "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32",
     "Reserved", "IntGate32", "TrapGate32"),
    ("<hiword>", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved",
     "Reserved", "Reserved", "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64",
     "Reserved", "IntGate64", "TrapGate64"),
)

_M64 = (1 << 64) - 1
_M32 = 0xFFFFFFFF


def _seg_line(name: str, cpu: CpuState, seg: str, *, cs64: bool, lma: bool, pe: bool) -> str:
    sel = cpu.get(seg) & 0xFFFF
    base = cpu.get(f"{seg}_base")
    limit = cpu.get(f"{seg}_limit") & _M32
    flags = cpu.get(f"{seg}_flags") & _M32
    if cs64:
        s = f"{name:<3}={sel:04x} {base & _M64:016x} {limit:08x} {flags & 0x00FFFF00:08x}"
    else:
        s = f"{name:<3}={sel:04x} {base & _M32:08x} {limit:08x} {flags & 0x00FFFF00:08x}"
    if pe and flags & DESC_P:
        s += f" DPL={(flags >> DESC_DPL_SHIFT) & 3} "
        if flags & DESC_S:
            if flags & DESC_CS:
                s += "CS64" if flags & DESC_L else ("CS32" if flags & DESC_B else "CS16")
                s += f" [{'C' if flags & DESC_C else '-'}{'R' if flags & DESC_R else '-'}"
            else:
                s += "DS  " if (flags & DESC_B or lma) else "DS16"
                s += f" [{'E' if flags & DESC_E else '-'}{'W' if flags & DESC_W else '-'}"
            s += f"{'A' if flags & DESC_A else '-'}]"
        else:
            s += _SYS_TYPES[1 if lma else 0][(flags >> 8) & 15]
    return s + "\n"


def _default_xcr0(cpu: CpuState) -> int:
    if "xcr0" in cpu.regs:
        return cpu.get("xcr0")
    return 0x7 if cpu.cr4 & CR4_OSXSAVE else 0x1


def info_registers(cpu: CpuState) -> str:
    """QEMU 7.2's ``info registers`` text for one vCPU (``"\\n"`` line ends). A vCPU whose registers are unknown
    (an SEV-ES guest's, encrypted in its VMSA) gets its header and the sentence that says why, and no value:
    QEMU 7.2 prints its cached reset state there, with no warning, which would be a silently wrong answer."""
    if not cpu.registers_known:
        return f"\nCPU#{cpu.index}\n{cpu.unavailable}\n"
    g = cpu.get
    efer = cpu.efer
    lma = bool(efer & EFER_LMA)
    cs64 = lma and bool(g("cs_flags") & DESC_L)
    pe = bool(cpu.cr0 & 1)
    eflags = g("rflags") & _M32
    if "cpl" in cpu.regs:
        cpl = g("cpl") & 3
    elif not pe:
        cpl = 0
    elif eflags & EFLAGS_VM:
        cpl = 3
    else:
        cpl = (g("ss_flags") >> DESC_DPL_SHIFT) & 3
    fl = "".join((
        "D" if eflags & EFLAGS_DF else "-", "O" if eflags & CC_O else "-",
        "S" if eflags & CC_S else "-", "Z" if eflags & CC_Z else "-",
        "A" if eflags & CC_A else "-", "P" if eflags & CC_P else "-",
        "C" if eflags & CC_C else "-",
    ))
    tail = (f"[{fl}] CPL={cpl} II={g('ii') & 1} A20={1 if 'a20' not in cpu.regs else g('a20') & 1} "
            f"SMM={g('smm') & 1} HLT={1 if cpu.halted else 0}\n")

    out = [f"\nCPU#{cpu.index}\n"]
    if cs64:
        r = [g(n) & _M64 for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                                   "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")]
        out.append(f"RAX={r[0]:016x} RBX={r[1]:016x} RCX={r[2]:016x} RDX={r[3]:016x}\n"
                   f"RSI={r[4]:016x} RDI={r[5]:016x} RBP={r[6]:016x} RSP={r[7]:016x}\n"
                   f"R8 ={r[8]:016x} R9 ={r[9]:016x} R10={r[10]:016x} R11={r[11]:016x}\n"
                   f"R12={r[12]:016x} R13={r[13]:016x} R14={r[14]:016x} R15={r[15]:016x}\n")
        out.append(f"RIP={g('rip') & _M64:016x} RFL={eflags:08x} " + tail)
    else:
        r = [g(n) & _M32 for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")]
        out.append(f"EAX={r[0]:08x} EBX={r[1]:08x} ECX={r[2]:08x} EDX={r[3]:08x}\n"
                   f"ESI={r[4]:08x} EDI={r[5]:08x} EBP={r[6]:08x} ESP={r[7]:08x}\n")
        out.append(f"EIP={g('rip') & _M32:08x} EFL={eflags:08x} " + tail)

    for name, seg in (("ES", "es"), ("CS", "cs"), ("SS", "ss"), ("DS", "ds"), ("FS", "fs"),
                      ("GS", "gs"), ("LDT", "ldt"), ("TR", "tr")):
        out.append(_seg_line(name, cpu, seg, cs64=cs64, lma=lma, pe=pe))

    dr = [g(f"dr{i}") & _M64 for i in range(4)]
    dr6 = g("dr6") if "dr6" in cpu.regs else 0xFFFF0FF0
    dr7 = g("dr7") if "dr7" in cpu.regs else 0x400
    if lma:
        out.append(f"GDT=     {g('gdt_base') & _M64:016x} {g('gdt_limit') & _M32:08x}\n")
        out.append(f"IDT=     {g('idt_base') & _M64:016x} {g('idt_limit') & _M32:08x}\n")
        out.append(f"CR0={cpu.cr0 & _M32:08x} CR2={g('cr2') & _M64:016x} "
                   f"CR3={cpu.cr3 & _M64:016x} CR4={cpu.cr4 & _M32:08x}\n")
    else:
        out.append(f"GDT=     {g('gdt_base') & _M32:08x} {g('gdt_limit') & _M32:08x}\n")
        out.append(f"IDT=     {g('idt_base') & _M32:08x} {g('idt_limit') & _M32:08x}\n")
        out.append(f"CR0={cpu.cr0 & _M32:08x} CR2={g('cr2') & _M32:08x} "
                   f"CR3={cpu.cr3 & _M32:08x} CR4={cpu.cr4 & _M32:08x}\n")
    # TARGET_FMT_lx is 16 digits on qemu-system-x86_64 in both branches.
    out.append("".join(f"DR{i}={dr[i]:016x} " for i in range(4)))
    out.append(f"\nDR6={dr6 & _M64:016x} DR7={dr7 & _M64:016x}\n")
    out.append(f"EFER={efer & _M64:016x}\n")

    # FPU / vector state: defaults unless the optional keys are present.
    fcw = g("fcw") if "fcw" in cpu.regs else 0x037F
    fpstt = g("fpstt") & 7
    fsw = (g("fsw") & ~0x3800 & 0xFFFF) | (fpstt << 11)
    ftw = g("ftw") & 0xFF
    mxcsr = g("mxcsr") if "mxcsr" in cpu.regs else 0x1F80
    out.append(f"FCW={fcw & 0xFFFF:04x} FSW={fsw:04x} [ST={fpstt}] FTW={ftw:02x} MXCSR={mxcsr & _M32:08x}\n")
    for i in range(8):
        v = g(f"fpr{i}")
        out.append(f"FPR{i}={v & _M64:016x} {(v >> 64) & 0xFFFF:04x}" + ("\n" if i & 1 else " "))

    xcr0 = _default_xcr0(cpu)
    avx512 = XSTATE_OPMASK | XSTATE_ZMM_HI256 | XSTATE_HI16_ZMM | XSTATE_YMM | XSTATE_SSE
    avx = XSTATE_YMM | XSTATE_SSE

    def q(i: int, k: int) -> int:
        return (g(f"xmm{i}") >> (64 * k)) & _M64

    if xcr0 & avx512 == avx512:
        for i in range(8):
            out.append(f"Opmask{i:02d}={g(f'opmask{i}') & _M64:016x}" + ("\n" if i & 3 == 3 else " "))
        for i in range(32 if cs64 else 8):
            out.append(f"ZMM{i:02d}=" + " ".join(f"{q(i, k):016x}" for k in range(7, -1, -1)) + "\n")
    elif xcr0 & avx == avx:
        for i in range(16 if cs64 else 8):
            out.append(f"YMM{i:02d}=" + " ".join(f"{q(i, k):016x}" for k in range(3, -1, -1)) + "\n")
    else:
        for i in range(16 if cs64 else 8):
            out.append(f"XMM{i:02d}={q(i, 1):016x} {q(i, 0):016x}" + ("\n" if i & 1 else " "))
    return "".join(out)
