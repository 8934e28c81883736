//! Where a case lives in guest memory, and the start state a case's numbers describe.
//!
//! Every mode shares one small map below 64 KiB, so 16-bit code and data segments reach it:
//!
//! | range | content |
//! | --- | --- |
//! | fixture tables (IVT or GDT/IDT/TSS, stubs, long-mode page tables) | as `duet_fixtures` writes them |
//! | `0x7c00` | top of the 16-bit stack (real mode, prot16) |
//! | `0x8000–0x8fff` | code |
//! | `0xa000–0xafff` | data |
//! | `0x6_0000` | top of the ring-3 stack |
//! | `0x8_0000` | end of RAM (top of the ring-0 stack); everything above is MMIO |

use duet_core::state::rflags;
use duet_core::{CpuState, Guest, Segment};
use duet_fixtures::tables::{gdt, sel};
use duet_fixtures::{start_state, GuestBuilder};

use super::case::{Case, FuzzMode, Parsed};
use super::FuzzError;

/// Guest RAM of a fuzz machine; every address at or above it is MMIO.
pub const RAM_SIZE: u64 = 0x8_0000;
/// Where the code is loaded (also the entry point).
pub const CODE_ADDR: u64 = 0x8000;
/// Where the data bytes are loaded.
pub const DATA_ADDR: u64 = 0xa000;
/// Top of the 16-bit stack.
pub const STACK16_TOP: u64 = 0x7c00;
/// Top of the ring-3 stack.
pub const USER_STACK_TOP: u64 = 0x6_0000;
/// Top of the ring-0 stack in 32- and 64-bit modes.
pub const STACK_TOP: u64 = 0x8_0000;
/// Stacks the CPU may push an interrupt frame on (top addresses): the mode stacks, RSP0, IST1.
pub const STACK_TOPS: [u64; 5] = [STACK16_TOP, USER_STACK_TOP, STACK_TOP, 0x7_8000, 0x7_4000];

/// The guest every case of `mode` starts from: fixture tables, no code yet, [`RAM_SIZE`] of RAM.
pub fn base_guest(mode: FuzzMode) -> Result<Guest, FuzzError> {
    let mut g = GuestBuilder::new(mode.fixture_mode())
        .name(format!("fuzz-{mode}"))
        .load_addr(CODE_ADDR)
        .image(vec![0xf4])
        .build()
        .map_err(|e| FuzzError::Setup(e.to_string()))?;
    g.ram_size = RAM_SIZE;
    g.loads.retain(|l| l.addr != CODE_ADDR);
    // Every present paging-structure entry starts with its accessed bit set. Otherwise whether a
    // case sees A = 0 or 1 when it reads a table depends on whether the previous case's
    // translations are still cached (SDM Vol. 3A §4.8, §4.10.2: A is set when an entry is used
    // for a walk, and a TLB hit needs none) — machines are reused between cases. Dirty bits are
    // left clear: setting them is part of what is compared.
    if mode.fixture_mode() == duet_fixtures::Mode::Long {
        for l in g.loads.iter_mut().filter(|l| l.addr == duet_core::layout::PAGE_TABLES_ADDR) {
            for e in l.bytes.chunks_mut(8) {
                if e[0] & 1 != 0 {
                    e[0] |= 0x20;
                }
            }
        }
    }
    Ok(g)
}

/// A protected-mode segment loaded from the fixtures' GDT with selector `s` (RPL from `s`).
fn gdt_segment(long: bool, s: u16) -> Segment {
    let table = gdt(long);
    match table.get(usize::from(s >> 3)) {
        Some(&raw) if s >> 3 != 0 => Segment::from_descriptor(s, raw),
        _ => Segment { selector: s, unusable: true, ..Segment::default() },
    }
}

/// Data selectors a case may load into DS/ES/FS/GS in `mode` (index 0 is the mode's default).
pub fn data_selectors(mode: FuzzMode) -> &'static [u16] {
    match mode {
        FuzzMode::Real => &[],
        FuzzMode::Prot16 => &[sel::DATA16, sel::DATA, 0],
        FuzzMode::Prot32 | FuzzMode::Long64 => &[sel::DATA, sel::DATA16, sel::KDATA, 0],
        FuzzMode::Prot32Ring3 | FuzzMode::Long64Ring3 => &[sel::UDATA | 3, 0],
    }
}

/// The start state of a case: the fixture state of its mode, adjusted by the case's numbers.
pub fn start(mode: FuzzMode, p: &Parsed) -> Result<CpuState, FuzzError> {
    let mut s = start_state(mode.fixture_mode(), CODE_ADDR).map_err(|e| FuzzError::Setup(e.to_string()))?;
    let long = matches!(mode, FuzzMode::Long64 | FuzzMode::Long64Ring3);
    // Selectors are 16 bits; a wider value in a case file is an error, not a silent truncation.
    if let Some((name, v)) = p.segments.iter().find(|(n, v)| !n.contains('.') && **v > 0xffff) {
        return Err(FuzzError::Setup(format!("segment selector {name} = {v:#x} does not fit in 16 bits")));
    }
    let seg = |name: &str| p.segments.get(name).copied();
    let r = &mut s.sregs;
    match mode {
        FuzzMode::Real => {
            r.cs = Segment::real_mode((CODE_ADDR >> 4) as u16, true);
            s.regs.rip = 0;
            r.ss = Segment::real_mode(0, false);
            for (name, slot) in [("ds", &mut r.ds), ("es", &mut r.es), ("fs", &mut r.fs), ("gs", &mut r.gs)] {
                *slot = Segment::real_mode(seg(name).unwrap_or(0) as u16, false);
            }
            if let Some(ss) = seg("ss") {
                r.ss = Segment::real_mode(ss as u16, false);
            }
        }
        _ => {
            let (cs, ss) = match mode {
                FuzzMode::Prot16 => (sel::CODE16, sel::DATA16),
                FuzzMode::Prot32 => (sel::CODE32, sel::DATA),
                FuzzMode::Prot32Ring3 => (sel::UCODE32 | 3, sel::UDATA | 3),
                FuzzMode::Long64 => (sel::CODE64, sel::DATA),
                _ => (sel::UCODE64 | 3, sel::UDATA | 3),
            };
            r.cs = gdt_segment(long, cs);
            r.ss = gdt_segment(long, ss);
            let default = data_selectors(mode).first().copied().unwrap_or(0);
            for (name, slot) in [("ds", &mut r.ds), ("es", &mut r.es), ("fs", &mut r.fs), ("gs", &mut r.gs)] {
                let v = seg(name).unwrap_or(u64::from(default)) as u16;
                if !data_selectors(mode).contains(&v) {
                    return Err(FuzzError::Setup(format!(
                        "{name} = {v:#x} is not a data selector of {mode}"
                    )));
                }
                *slot = gdt_segment(long, v);
                if long && slot.unusable {
                    // A null selector in 64-bit mode still leaves a base for FS/GS.
                    slot.present = false;
                }
            }
            if long {
                r.fs.base = seg("fs.base").unwrap_or(0);
                r.gs.base = seg("gs.base").unwrap_or(0);
            }
        }
    }
    // The LDTR is marked invalid, as after `lldt` of a null selector (what an operating system
    // leaves; SDM Vol. 2A LLDT): a TI = 1 selector is then #GP(selector). The reset state's LDTR
    // (selector 0, base 0, limit 0xFFFF, present; SDM Vol. 3A Table 10-1) is not what fuzzed
    // programs should depend on.
    // Real mode keeps the reset LDTR (it has no LDT, and QEMU's reference needs reset values).
    if mode != FuzzMode::Real {
        s.sregs.ldt = Segment { unusable: true, present: false, ..Segment::default() };
    }
    s.regs.set_gprs(&p.gprs);
    // Every tracked MSR is set, so nothing a previous case wrote (SWAPGS, WRMSR) survives.
    for &index in &duet_core::state::TRACKED_MSRS {
        let v = if index == duet_core::state::msr::PAT { 0x0007_0406_0007_0406 } else { 0 };
        s.msrs.insert(index, v);
    }
    // Reserved bit 1 is set; TF, VM, RF, NT stay clear so the run is not single-stepped or nested.
    let keep = rflags::STATUS | rflags::DF | rflags::IF | rflags::IOPL | rflags::AC;
    s.regs.rflags = (p.rflags & keep) | rflags::FIXED;

    if mode != FuzzMode::Real {
        s.regs.rip = CODE_ADDR;
    }
    Ok(s)
}

/// The initial RAM image of a case: the base guest plus code and data.
pub fn initial_image(base: &[u8], p: &Parsed) -> Vec<u8> {
    let mut img = base.to_vec();
    let put = |img: &mut Vec<u8>, at: u64, b: &[u8]| {
        let at = at as usize;
        if let Some(dst) = img.get_mut(at..at + b.len()) {
            dst.copy_from_slice(b);
        }
    };
    put(&mut img, CODE_ADDR, &p.code);
    put(&mut img, DATA_ADDR, &p.data);
    img
}

/// The bytes of `guest`'s RAM after its loads, without creating a VM.
pub fn image_of(guest: &Guest) -> Result<Vec<u8>, FuzzError> {
    let mut img = vec![0u8; guest.ram_size as usize];
    for l in &guest.loads {
        let at = l.addr as usize;
        let dst = img
            .get_mut(at..at + l.bytes.len())
            .ok_or_else(|| FuzzError::Setup(format!("load at {:#x} does not fit", l.addr)))?;
        dst.copy_from_slice(&l.bytes);
    }
    Ok(img)
}

/// Parses `case` and builds its start state; `file` names it in errors.
pub fn prepare(case: &Case, file: &str) -> Result<(Parsed, CpuState), FuzzError> {
    let p = case.parse(file)?;
    let s = start(case.mode, &p)?;
    Ok((p, s))
}

/// The base guest's RAM image of `mode`, built once per process.
pub fn base_image(mode: FuzzMode) -> Result<std::sync::Arc<Vec<u8>>, FuzzError> {
    use std::sync::{Arc, Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<std::collections::BTreeMap<FuzzMode, Arc<Vec<u8>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(img) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&mode) {
        return Ok(img.clone());
    }
    let img = Arc::new(image_of(&base_guest(mode)?)?);
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(mode, img.clone());
    Ok(img)
}
