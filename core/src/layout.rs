//! Guest conventions every backend, device and fixture relies on: ports and the memory map.
//!
//! Guest physical memory map used by the fixtures' `GuestBuilder`:
//!
//! | range | content |
//! | --- | --- |
//! | `0x0000–0x03ff` | real-mode IVT |
//! | `0x0500–0x053f` | exception report area ([`ExceptionReport`]) |
//! | `0x0600–0x06ff` | 64-bit TSS (RSP0 and IST1 point at the stacks below) |
//! | `0x1000–0x1fff` | GDT |
//! | `0x2000–0x2fff` | IDT (256 gates) |
//! | `0x3000–0x4fff` | IDT stubs (one per vector) |
//! | `0x7c00` | default load address in real mode (stack grows down from here) |
//! | `0x10000–0x15fff` | page tables: PML4, PDPT, four page directories (first 4 GiB identity-mapped) |
//! | `0x70000–0x7ffff` | stack (grows down from `0x80000`) |
//! | `0x100000` | default load address in protected and long mode |
//! | `0xd000_0000` | MMIO test device (unbacked, so MMIO on every backend) |

/// 16550 UART base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Debug console port: each byte written is console output (Bochs/QEMU convention).
pub const DEBUG_CONSOLE_PORT: u16 = 0xe9;
/// Debug exit port: writing v ends the run with exit code (v << 1) | 1 (QEMU isa-debug-exit).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// POST-code port: the last byte written is reported at the end of the run.
pub const POST_CODE_PORT: u16 = 0x80;

/// Guest physical address of the exception report area written by the fixtures' IDT stubs.
pub const EXCEPTION_REPORT_ADDR: u64 = 0x500;
/// Magic value in the report area's first dword when an exception has been reported ("EXCP").
pub const EXCEPTION_REPORT_MAGIC: u32 = u32::from_le_bytes(*b"EXCP");
/// Guest physical address of the 64-bit TSS.
pub const TSS_ADDR: u64 = 0x600;
/// Guest physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest physical address of the IDT.
pub const IDT_ADDR: u64 = 0x2000;
/// Guest physical address of the IDT stubs.
pub const IDT_STUBS_ADDR: u64 = 0x3000;
/// Guest physical address of the PML4 (followed by the PDPT and four page directories).
pub const PAGE_TABLES_ADDR: u64 = 0x10000;
/// Initial stack pointer in protected and long mode.
pub const STACK_TOP: u64 = 0x80000;
/// Initial stack pointer in real mode (SS = 0).
pub const REAL_MODE_STACK_TOP: u64 = 0x7c00;
/// Default load address of a real-mode image.
pub const REAL_MODE_LOAD_ADDR: u64 = 0x7c00;
/// Default load address of a protected- or long-mode image.
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Base of the MMIO test device.
pub const MMIO_TEST_BASE: u64 = 0xd000_0000;
/// Default guest RAM size.
pub const DEFAULT_MEM_SIZE: u64 = 32 << 20;

/// What an IDT stub reports: vector, error code (0 when the vector has none) and faulting RIP.
///
/// Layout at [`EXCEPTION_REPORT_ADDR`]: `magic: u32, vector: u32, error_code: u64, rip: u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExceptionReport {
    /// Exception vector (0–255).
    pub vector: u8,
    /// Error code pushed by the CPU, or 0.
    pub error_code: u64,
    /// RIP saved in the exception frame.
    pub rip: u64,
}

impl ExceptionReport {
    /// Parses the 24-byte report area; `None` when the magic is absent.
    pub fn parse(bytes: &[u8; 24]) -> Option<Self> {
        let word = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
        let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        (magic == EXCEPTION_REPORT_MAGIC).then(|| ExceptionReport {
            vector: bytes[4],
            error_code: word(8),
            rip: word(16),
        })
    }

    /// Short mnemonic of the vector (`#GP`, `#PF`, …) or `INT n`.
    pub fn name(&self) -> String {
        exception_name(self.vector)
    }
}

impl std::fmt::Display for ExceptionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (vector {}) error code {:#x} at rip {:#x}",
            self.name(),
            self.vector,
            self.error_code,
            self.rip
        )
    }
}

/// The SDM mnemonic of an exception vector (Vol. 3A §6.3.1, Table 6-1).
pub fn exception_name(vector: u8) -> String {
    const NAMES: [&str; 22] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP",
        "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    ];
    NAMES.get(usize::from(vector)).map_or_else(|| format!("INT {vector:#x}"), |s| s.to_string())
}

/// Whether the CPU pushes an error code for `vector` in protected/long mode (SDM Vol. 3A Table 6-1).
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_parses_only_with_magic() {
        let mut b = [0u8; 24];
        assert_eq!(ExceptionReport::parse(&b), None);
        b[0..4].copy_from_slice(b"EXCP");
        b[4] = 14;
        b[8] = 2;
        b[16..24].copy_from_slice(&0x1234u64.to_le_bytes());
        let r = ExceptionReport::parse(&b).unwrap();
        assert_eq!(r, ExceptionReport { vector: 14, error_code: 2, rip: 0x1234 });
        assert_eq!(r.to_string(), "#PF (vector 14) error code 0x2 at rip 0x1234");
    }

    #[test]
    fn error_code_vectors_match_the_sdm_table() {
        let with: Vec<u8> = (0..=255).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, vec![8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
        assert_eq!(exception_name(13), "#GP");
        assert_eq!(exception_name(0x80), "INT 0x80");
    }
}
