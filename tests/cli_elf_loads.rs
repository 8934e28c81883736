//! `duet run` with an ELF image of several segments: a segment (file bytes or zero-filled
//! part) that would land on what the guest builder places in RAM (GDT, IDT, page tables,
//! stacks…) is refused with both ranges.

use std::process::{Command, Output};

fn duet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duet")).args(args).output().expect("the duet binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An ELF64 x86-64 file (System V gABI) whose entry segment holds `code` at 0x200000 and whose
/// second PT_LOAD puts `data` at physical address `data_at`, followed by `bss` zero bytes.
fn elf(code: &[u8], data: &[u8], data_at: u64, bss: u64) -> Vec<u8> {
    const PH: usize = 64;
    const PHSIZE: usize = 56;
    let code_off = PH + 2 * PHSIZE;
    let data_off = code_off + code.len();
    let mut f = vec![0u8; code_off];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little-endian
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&(PH as u64).to_le_bytes()); // e_phoff
    f[54..56].copy_from_slice(&(PHSIZE as u16).to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let segments = [(code_off, 0x20_0000u64, code.len(), 0), (data_off, data_at, data.len(), bss)];
    for (i, (off, addr, len, zeros)) in segments.into_iter().enumerate() {
        let p = PH + i * PHSIZE;
        f[p..p + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[p + 8..p + 16].copy_from_slice(&(off as u64).to_le_bytes()); // p_offset
        f[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes()); // p_vaddr
        f[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes()); // p_paddr
        f[p + 32..p + 40].copy_from_slice(&(len as u64).to_le_bytes()); // p_filesz
        f[p + 40..p + 48].copy_from_slice(&(len as u64 + zeros).to_le_bytes()); // p_memsz
    }
    f.extend_from_slice(code);
    f.extend_from_slice(data);
    f
}

/// A temporary file removed when dropped.
struct TempFile(std::path::PathBuf);
impl TempFile {
    fn new(tag: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("duet-cli-elf-loads-{tag}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}
impl Drop for TempFile {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

#[test]
fn elf_segment_or_its_bss_over_the_gdt_is_refused_with_both_ranges() {
    // mov al, [0x300000] ; out 0xe9, al ; cli ; hlt (SDM Vol. 2: A0 moffs64, E6 ib, FA, F4):
    // prints the first byte of the second segment.
    let code = [0xa0, 0, 0, 0x30, 0, 0, 0, 0, 0, 0xe6, 0xe9, 0xfa, 0xf4];
    let good = TempFile::new("good", &elf(&code, b"D", 0x30_0000, 0x100));
    let out = duet(&["run", "--backend", "interp", good.arg()]);
    // The CLI ends console output with a newline when the guest did not.
    assert_eq!(text(&out.stdout), "D\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));

    // The long-mode GDT is 12 descriptors at 0x1000 (duet_core::layout::GDT_ADDR):
    // 0x1000..0x1060. A 16-byte segment at 0x1058 overlaps its last slot.
    let bad = TempFile::new("gdt", &elf(&code, &[0xaa; 16], 0x1058, 0));
    let out = duet(&["run", "--backend", "interp", bad.arg()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("duet: error:") && err.contains(bad.arg()), "{err}");
    assert!(err.contains("bytes to load at 0x1058..0x1068 overlap the GDT at 0x1000..0x1060"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // No file bytes, 0x100 zero-filled bytes at 0xf80: the guest would zero the GDT itself.
    let bss = TempFile::new("bss", &elf(&code, &[], 0xf80, 0x100));
    let out = duet(&["run", "--backend", "interp", bss.arg()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bytes to load at 0xf80..0x1080 overlap the GDT at 0x1000..0x1060"), "{err}");
}
