//! Checks that the stub can produce a start state exactly, against the guest's own tables.

use duet_core::state::ctrl;
use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{CpuMode, CpuState, GuestMemory, Segment};

use super::{unsupported, ROM_BASE, STUB_SPAN};
use crate::QemuError;

/// Reads the little-endian u64 at guest physical `addr`.
fn read_u64(mem: &GuestMemory, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
    Some(u64::from_le_bytes(b))
}

/// Translates `lin` through 4-level paging (SDM Vol. 3A §4.5): physical address and whether
/// every level allows writes and execution.
pub fn translate4(mem: &GuestMemory, cr3_value: u64, lin: u64) -> Option<(u64, bool, bool)> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let (mut table, mut writable, mut exec) = (cr3_value & ADDR, true, true);
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let e = read_u64(mem, table + ((lin >> shift) & 511) * 8)?;
        if e & 1 == 0 {
            return None;
        }
        writable &= e & 2 != 0;
        exec &= e & (1 << 63) == 0;
        let page = (level == 3 || level == 2) && e & 0x80 != 0;
        if page || level == 1 {
            let mask = (1u64 << shift) - 1;
            return Some(((e & ADDR & !mask) | (lin & mask), writable, exec));
        }
        table = e & ADDR;
    }
    None
}

/// The paging-structure entries (physical address, value) a 4-level walk of `lin` reads.
pub(super) fn walk_entries(mem: &GuestMemory, cr3_value: u64, lin: u64) -> Vec<(u64, u64)> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let (mut table, mut out) = (cr3_value & ADDR, Vec::new());
    for (level, shift) in [(4, 39u32), (3, 30), (2, 21), (1, 12)] {
        let at = table + ((lin >> shift) & 511) * 8;
        let Some(e) = read_u64(mem, at) else { break };
        out.push((at, e));
        if e & 1 == 0 || ((level == 3 || level == 2) && e & 0x80 != 0) {
            break;
        }
        table = e & ADDR;
    }
    out
}

/// Where a segment's descriptor lives and what it holds.
struct Desc {
    /// Linear address of the 8-byte descriptor (what the stub's writes use).
    linear: u64,
    /// The low 8 bytes.
    raw: u64,
    /// The next 8 bytes (system descriptors in long mode).
    high: u64,
}

/// Everything the stub needs to know, checked against the guest.
pub(super) struct Plan<'a> {
    pub(super) s: &'a CpuState,
    pub(super) mode: CpuMode,
    pub(super) mem: &'a GuestMemory,
}

impl Plan<'_> {
    fn phys(&self, lin: u64) -> Result<u64, QemuError> {
        if self.mode == CpuMode::Long64 {
            translate4(self.mem, self.s.sregs.cr3, lin)
                .map(|t| t.0)
                .ok_or_else(|| unsupported(format!("the guest's page tables do not map its GDT at {lin:#x}")))
        } else {
            Ok(lin)
        }
    }

    /// The GDT descriptor of `sel` from guest memory.
    fn descriptor(&self, name: &str, sel: u16) -> Result<Desc, QemuError> {
        if sel & 4 != 0 {
            return Err(unsupported(format!("{name} selector {sel:#x} refers to an LDT")));
        }
        let gdt = self.s.sregs.gdt;
        let off = u64::from(sel & !7);
        if off + 7 > u64::from(gdt.limit) {
            return Err(unsupported(format!(
                "{name} selector {sel:#x} is beyond the GDT limit {:#x}",
                gdt.limit
            )));
        }
        let linear = gdt.base.wrapping_add(off);
        let addr = self.phys(linear)?;
        let raw = read_u64(self.mem, addr)
            .ok_or_else(|| unsupported(format!("{name} descriptor at {addr:#x} is not in guest RAM")))?;
        let high = read_u64(self.mem, addr + 8).unwrap_or(0);
        Ok(Desc { linear, raw, high })
    }

    /// Checks that loading `seg.selector` from the GDT yields exactly `seg` (bases of FS/GS in
    /// 64-bit mode excepted: they are written through their MSRs).
    pub(super) fn check_segment(&self, name: &str, seg: &Segment) -> Result<(), QemuError> {
        if seg.selector & !3 == 0 {
            if name != "cs" && name != "ss" && seg.unusable {
                return Ok(());
            }
            return Err(unsupported(format!("{name} holds a null selector with a usable hidden part")));
        }
        let d = self.descriptor(name, seg.selector)?;
        if d.raw & (1 << 40) == 0 {
            return Err(unsupported(format!(
                "{name} descriptor {:#018x} has the accessed bit clear; loading it would change guest memory",
                d.raw
            )));
        }
        let mut want = Segment::from_descriptor(seg.selector, d.raw);
        let mut have = *seg;
        if self.mode == CpuMode::Long64 && (name == "fs" || name == "gs") {
            (want.base, have.base) = (0, 0);
        }
        if want != have {
            return Err(unsupported(format!(
                "{name} hidden part {seg:?} differs from what its descriptor {:#018x} loads ({want:?})",
                d.raw
            )));
        }
        Ok(())
    }

    /// A selector of the guest's GDT for the stub's own 64-bit code at CPL 0, when the guest
    /// starts in an outer ring: its first present, accessed, DPL-0 64-bit code descriptor.
    pub(super) fn kernel_code64(&self) -> Result<u16, QemuError> {
        let gdt = self.s.sregs.gdt;
        for index in 1..=u64::from(gdt.limit) / 8 {
            let Ok(addr) = self.phys(gdt.base.wrapping_add(index * 8)) else { continue };
            let Some(raw) = read_u64(self.mem, addr) else { continue };
            let d = Segment::from_descriptor((index * 8) as u16, raw);
            if d.present && d.s && d.type_ & 0x9 == 0x9 && d.type_ & 0x4 == 0 && d.l && !d.db && d.dpl == 0 {
                return Ok((index * 8) as u16);
            }
        }
        Err(unsupported(
            "the guest's GDT has no present, accessed, DPL-0 64-bit code descriptor for the stub to run \
             from before its IRETQ to the guest's ring",
        ))
    }

    /// For TR/LDTR: `None` when the register holds its RESET value (left as QEMU resets it),
    /// else the linear address of the descriptor's access byte and its value to restore after
    /// loading (unused for LDTR, which LLDT leaves alone; `(0, 0)` for a null LDTR).
    pub(super) fn check_system(
        &self,
        name: &str,
        seg: &Segment,
        reset: &Segment,
    ) -> Result<Option<(u64, u8)>, QemuError> {
        if seg == reset {
            return Ok(None);
        }
        if name == "ldtr" && seg.selector & !3 == 0 && seg.unusable {
            // A null LDTR (as after `lldt 0`): LLDT with a null selector marks it invalid
            // (SDM Vol. 2A LLDT); there is no descriptor, so nothing to restore.
            return Ok(Some((0, 0)));
        }
        let d = self.descriptor(name, seg.selector)?;
        let busy = if name == "tr" { 1u64 << 41 } else { 0 };
        let mut want = Segment::from_descriptor(seg.selector, d.raw | busy);
        if self.mode == CpuMode::Long64 {
            want.base |= (d.high & 0xffff_ffff) << 32;
        }
        if want != *seg {
            return Err(unsupported(format!(
                "{name} hidden part {seg:?} differs from what its descriptor {:#018x} loads ({want:?})",
                d.raw
            )));
        }
        Ok(Some((d.linear.wrapping_add(5), (d.raw >> 40) as u8)))
    }
}

/// The privilege level a protected-mode start state runs at: CS's RPL, which must equal the DPL
/// of CS (non-conforming) and of SS and SS's RPL, as after any far transfer (SDM Vol. 3A §5.5,
/// §5.7). The stub enters ring 0 with a far JMP and an outer ring with IRET.
pub(super) fn start_cpl(s: &CpuState) -> Result<u8, QemuError> {
    let (cs, ss) = (&s.sregs.cs, &s.sregs.ss);
    let cpl = (cs.selector & 3) as u8;
    if cs.dpl != cpl || ss.dpl != cpl || (ss.selector & 3) as u8 != cpl {
        return Err(unsupported(format!(
            "CS {:#x} (DPL {}) and SS {:#x} (DPL {}) do not describe one privilege level",
            cs.selector, cs.dpl, ss.selector, ss.dpl
        )));
    }
    Ok(cpl)
}

/// Outside long mode the stub writes 32-bit registers; the GPRs' upper halves and R8–R15 are
/// written through the gdbstub at the guest's first instruction (`crate::wide`).
pub(super) fn check_high_bits(s: &CpuState) -> Result<(), QemuError> {
    if s.regs.rip > u64::from(u32::MAX) {
        return Err(unsupported(format!("RIP {:#x} above 32 bits outside long mode", s.regs.rip)));
    }
    let r = &s.sregs;
    if r.cr2 > u64::from(u32::MAX) || r.cr3 > u64::from(u32::MAX) || r.cr8 != 0 {
        return Err(unsupported("outside long mode, CR2/CR3 must fit 32 bits and CR8 must be zero"));
    }
    Ok(())
}

pub(super) fn check_real(s: &CpuState) -> Result<(), QemuError> {
    check_high_bits(s)?;
    let r = &s.sregs;
    for (name, seg) in r.segments() {
        if *seg != Segment::real_mode(seg.selector, name == "cs") {
            return Err(unsupported(format!(
                "real-mode {name} hidden part {seg:?} is not what loading selector {:#x} in real mode gives \
                 (for a RESET-state ROM guest use GuestBuilder::bios, which QEMU runs with -bios)",
                seg.selector
            )));
        }
    }
    let reset = CpuState::reset().sregs;
    if r.tr != reset.tr || r.ldt != reset.ldt {
        return Err(unsupported("real-mode start state with TR/LDTR other than their RESET values"));
    }
    if s.regs.rip > 0xffff {
        return Err(unsupported(format!("real-mode RIP {:#x} beyond 0xffff", s.regs.rip)));
    }
    if r.gdt.base > u64::from(u32::MAX) || r.idt.base > u64::from(u32::MAX) {
        return Err(unsupported("GDTR/IDTR base above 4 GiB in real mode"));
    }
    Ok(())
}

/// The stub's pages must translate to themselves under the guest's 4-level tables.
pub(super) fn check_identity(s: &CpuState, mem: &GuestMemory) -> Result<(), QemuError> {
    let wp = s.sregs.cr0 & ctrl::CR0_WP != 0;
    for page in (ROM_BASE..ROM_BASE + STUB_SPAN).step_by(4096) {
        match translate4(mem, s.sregs.cr3, page) {
            Some((phys, w, x)) if phys == page && x && (w || !wp) => {}
            _ => {
                return Err(unsupported(format!(
                    "the guest's page tables (CR3 {:#x}) do not identity-map the entry stub at {page:#x} \
                     (writable, executable), which long-mode entry needs",
                    s.sregs.cr3
                )))
            }
        }
    }
    Ok(())
}
