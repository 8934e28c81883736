//! Loading an ELF image by its program headers (ELF32 or ELF64, little-endian x86).
//!
//! linux-loader's ELF loader writes straight into guest memory and accepts only ELF64 kernels;
//! duet needs the loadable segments as data (so every backend, and a reset, loads the same
//! bytes) and also 32-bit images, so this reads the headers itself, bounds-checking every field.

use duet_core::Load;

/// An ELF file's loadable segments and entry point.
#[derive(Debug, PartialEq, Eq)]
pub struct ElfImage {
    /// Entry point (e_entry).
    pub entry: u64,
    /// Whether it is ELF64 (else ELF32).
    pub is_64: bool,
    /// PT_LOAD segments' file bytes at their physical addresses (the zero-filled rest up to
    /// p_memsz is not materialised: fresh guest RAM is already zero).
    pub loads: Vec<Load>,
    /// The zero-filled parts (p_memsz beyond p_filesz), as (address, length).
    pub zeroed: Vec<(u64, u64)>,
    /// The end (exclusive) of the highest segment in memory, p_paddr + p_memsz.
    pub end: u64,
}

/// Whether `bytes` starts with the ELF magic.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

fn field(b: &[u8], off: usize, len: usize) -> Result<u64, String> {
    // Offsets come from the file: say them in hex, never as a size (they may be near 2^64).
    let s = b.get(off..off.saturating_add(len)).ok_or_else(|| {
        format!("ELF file truncated: a {len}-byte field at offset {off:#x} lies beyond its {} bytes", b.len())
    })?;
    let mut v = [0u8; 8];
    v[..len].copy_from_slice(s);
    Ok(u64::from_le_bytes(v))
}

/// Parses the ELF header and program headers (System V ABI, ELF header and program header table).
pub fn parse(b: &[u8]) -> Result<ElfImage, String> {
    if !is_elf(b) {
        return Err("not an ELF file (no \\x7fELF magic)".into());
    }
    let is_64 = match field(b, 4, 1)? {
        1 => false,
        2 => true,
        c => return Err(format!("ELF class {c} is neither 32-bit (1) nor 64-bit (2)")),
    };
    if field(b, 5, 1)? != 1 {
        return Err("ELF file is big-endian; x86 images are little-endian".into());
    }
    let machine = field(b, 18, 2)?;
    if machine != 3 && machine != 62 {
        return Err(format!("ELF machine {machine} is not x86 (3) or x86-64 (62)"));
    }
    let w = if is_64 { 8 } else { 4 };
    let entry = field(b, 24, w)?;
    let phoff = field(b, if is_64 { 32 } else { 28 }, w)? as usize;
    let (phentsize, phnum) =
        if is_64 { (field(b, 54, 2)?, field(b, 56, 2)?) } else { (field(b, 42, 2)?, field(b, 44, 2)?) };
    let min_ent = if is_64 { 56 } else { 32 };
    if phentsize < min_ent {
        return Err(format!("ELF program header size {phentsize} is smaller than {min_ent}"));
    }
    let table = phnum.checked_mul(phentsize).and_then(|n| usize::try_from(n).ok());
    if table.and_then(|n| phoff.checked_add(n)).is_none_or(|end| end > b.len()) {
        return Err(format!(
            "ELF program header table ({phnum} entries of {phentsize} bytes at offset {phoff:#x}) lies outside the file ({} bytes)",
            b.len()
        ));
    }
    let mut loads = Vec::new();
    let mut zeroed = Vec::new();
    let mut end = 0u64;
    for i in 0..phnum as usize {
        let ph = phoff.checked_add(i * phentsize as usize).ok_or("program header offset overflows")?;
        if field(b, ph, 4)? != 1 {
            continue; // only PT_LOAD segments occupy memory
        }
        // Saturating: a header offset near the top of the address space reads as "truncated".
        let at = |o: usize, len: usize| field(b, ph.saturating_add(o), len);
        let (offset, paddr, filesz, memsz) = if is_64 {
            (at(8, 8)?, at(24, 8)?, at(32, 8)?, at(40, 8)?)
        } else {
            (at(4, 4)?, at(12, 4)?, at(16, 4)?, at(20, 4)?)
        };
        let seg_end = paddr.checked_add(memsz).filter(|&e| e <= 1 << 32 && filesz <= memsz);
        let Some(seg_end) = seg_end else {
            return Err(format!(
                "ELF segment {i}: file size {filesz:#x} and memory size {memsz:#x} at {paddr:#x} are inconsistent or beyond 4 GiB"
            ));
        };
        let data = b
            .get(offset as usize..(offset.saturating_add(filesz)) as usize)
            .ok_or_else(|| format!("ELF segment {i} ({offset:#x}+{filesz:#x}) lies outside the file"))?;
        end = end.max(seg_end);
        loads.push(Load { addr: paddr, bytes: data.to_vec() });
        if memsz > filesz {
            zeroed.push((paddr + filesz, memsz - filesz));
        }
    }
    if loads.is_empty() {
        return Err("ELF file has no loadable (PT_LOAD) segment".into());
    }
    Ok(ElfImage { entry, is_64, loads, zeroed, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made ELF64 with one PT_LOAD segment, laid out as the System V ABI gABI says.
    fn elf64(code: &[u8], paddr: u64, memsz: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // ELFDATA2LSB
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[24..32].copy_from_slice(&(paddr + 4).to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
        f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes()); // p_memsz
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn elf64_segment_is_loaded_with_bss_zeroed() {
        let img = parse(&elf64(&[0xf4, 0x90], 0x200000, 8)).unwrap();
        assert_eq!(img.entry, 0x200004);
        assert!(img.is_64);
        assert_eq!(img.loads, vec![Load { addr: 0x200000, bytes: vec![0xf4, 0x90] }]);
        assert_eq!(img.zeroed, vec![(0x200002, 6)]);
        assert_eq!(img.end, 0x200008);
    }

    #[test]
    fn malformed_elf_files_get_clear_errors() {
        let good = elf64(&[0xf4], 0x1000, 1);
        assert!(parse(&good[..40]).unwrap_err().contains("truncated"));
        let mut big_endian = good.clone();
        big_endian[5] = 2;
        assert!(parse(&big_endian).unwrap_err().contains("big-endian"));
        let mut outside = good.clone();
        outside[64 + 8..64 + 16].copy_from_slice(&0xffff_ffffu64.to_le_bytes());
        assert!(parse(&outside).unwrap_err().contains("outside the file"));
        let mut far_headers = good.clone();
        far_headers[32..40].copy_from_slice(&(u64::MAX - 15).to_le_bytes());
        // The offset is given as the file has it, in hex; no size computed from it.
        assert_eq!(
            parse(&far_headers).unwrap_err(),
            "ELF program header table (1 entries of 56 bytes at offset 0xfffffffffffffff0) lies outside the file (121 bytes)"
        );
        let mut huge_bss = good.clone();
        huge_bss[64 + 40..64 + 48].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(parse(&huge_bss).unwrap_err().contains("beyond 4 GiB"));
        let mut bss_smaller = good.clone();
        bss_smaller[64 + 40..64 + 48].copy_from_slice(&0u64.to_le_bytes());
        assert!(parse(&bss_smaller).unwrap_err().contains("inconsistent"));
        assert!(parse(b"MZ\x90\x00").unwrap_err().contains("not an ELF"));
    }
}
