"""x86 page-table entry bits (target/i386/cpu.h, Intel SDM vol. 3 §4): one definition for the
walkers, the guests that build tables (built-in, scale) and the C-bit converter."""

PG_PRESENT = 1 << 0
PG_RW = 1 << 1
PG_USER = 1 << 2
PG_PWT = 1 << 3
PG_PCD = 1 << 4
PG_ACCESSED = 1 << 5
PG_DIRTY = 1 << 6
PG_PSE = 1 << 7
PG_GLOBAL = 1 << 8
PG_NX = 1 << 63

#: Address bits 12..51: what the CPU (and QEMU's gva2gpa) uses.
PG_ADDRESS_MASK = 0x000FFFFFFFFFF000
#: What Linux puts in an entry that points to a lower-level table (``_PAGE_TABLE``, without ``_PAGE_ENC``).
TABLE_FLAGS = PG_PRESENT | PG_RW | PG_USER | PG_ACCESSED
