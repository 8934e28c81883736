//! The entry stub: a 256 KiB firmware image that QEMU runs from the reset vector and that
//! installs a guest's start state, so no other firmware runs before the guest.
//!
//! Where it lives: QEMU's `isapc` machine maps the firmware at [`ROM_BASE`]`..4 GiB` and
//! aliases its last 128 KiB at `0xe0000..0x100000` (RAM-backed and writable on `isapc`). The
//! stub's code and data sit in the first 64 KiB of the image, which only appear at
//! `0xfffc_0000`, above any duet guest's RAM (at most 3 GiB). The only bytes it needs in the
//! guest-visible window are the reset code at `0xfff00..0x100000` (the reset vector is at
//! `0xffff0`); the stub zeroes them before entering the guest, and guests that load bytes there
//! are refused. Everything else below 1 MiB reads as zeros, as in duet's RAM.
//!
//! What it does: from the reset vector it enters 32-bit protected mode with its own GDT, masks
//! both 8259 PICs (duet's machine has no PIC or timer, so no interrupt may arrive), zeroes the
//! reset code, writes the tracked MSRs, EFER, CR4, CR3, CR2 and CR0, loads the guest's GDTR and
//! IDTR, loads every segment register from the guest's own descriptor tables (TR with its
//! descriptor's busy bit handled so guest memory ends as it started), sets RFLAGS with
//! POPF from a value in the stub, then the GPRs with MOVs (which leave flags alone), and jumps
//! to the guest's CS:RIP. A guest that starts above ring 0 is entered with IRET instead (its SS
//! cannot be loaded at CPL 0), whose frame also carries RFLAGS; in long mode the stub's 64-bit
//! code then runs from the guest's first DPL-0 64-bit code segment. Outside long mode the stub
//! writes only the low halves of the GPRs: the rest is written through the gdbstub at the
//! guest's first instruction ([`crate::wide`]). Real-mode targets leave protected mode through a 16-bit segment;
//! long-mode targets turn paging on with the guest's tables, so the stub's first 64 KiB must be
//! identity-mapped by them (checked before the run).
//!
//! The stub can only produce hidden segment parts that loading the selectors produces, so a
//! start state whose hidden parts differ from its descriptors is refused with
//! [`QemuError::Unsupported`] rather than run as something else.

use duet_core::state::{ctrl, msr, rflags, TRACKED_MSRS};
use duet_core::{CpuMode, CpuState, FxArea, GuestMemory, Segment};
use iced_x86::code_asm::*;

use crate::QemuError;

mod checks;

pub use checks::translate4;
use checks::{check_high_bits, check_identity, check_real, start_cpl, walk_entries, Plan};

/// Size of the firmware image.
pub const ROM_SIZE: usize = 0x4_0000;
/// Guest physical address of the firmware image (it ends at 4 GiB).
pub const ROM_BASE: u64 = (1 << 32) - ROM_SIZE as u64;
/// Guest-visible window the reset code occupies (low alias of the firmware's last 256 bytes).
pub const RESET_WINDOW: (u64, u64) = (0xf_ff00, 0x10_0000);
/// Bytes of the image (from [`ROM_BASE`]) the stub uses once the guest's paging is on.
pub const STUB_SPAN: u64 = 0x1_0000;

const RESET_CODE_OFF: usize = ROM_SIZE - 0x100;
const BODY_OFF: u64 = 0x100;
const CODE64_OFF: u64 = 0x2000;
const TAIL16_OFF: u64 = 0x3000;
/// Data: guest GDTR pseudo-descriptor at +0, IDTR at +0x10, RFLAGS at +0x20, and the IRET
/// frame that enters an outer ring at [`IRET_FRAME_OFF`].
const DATA_OFF: u64 = 0x4000;
/// The 32-bit IRET frame (EIP, CS, EFLAGS, ESP, SS) that enters a guest starting above ring 0.
const IRET_FRAME_OFF: u64 = DATA_OFF + 0x40;

const SEL_CODE32: u16 = 0x08;
const SEL_DATA32: u16 = 0x10;
const SEL_CODE16: u16 = 0x18;
const SEL_DATA16: u16 = 0x20;

/// RFLAGS bits the stub cannot set with POPF at CPL 0 (or must not: TF would trap at once).
const FORBIDDEN_FLAGS: u64 = rflags::TF | rflags::VM | rflags::RF | rflags::VIF | rflags::VIP;

fn unsupported(msg: impl Into<String>) -> QemuError {
    QemuError::Unsupported(msg.into())
}

/// The stub's own GDT: null, flat code32, flat data32, code16 at `ROM_BASE`, data16 at 0.
fn stub_gdt() -> [u64; 5] {
    let seg = |base: u64, limit: u32, type_: u8, db: bool, g: bool| {
        Segment { base, limit, type_, present: true, s: true, db, g, ..Segment::default() }.to_descriptor()
    };
    [
        0,
        seg(0, 0xffff_ffff, 0xb, true, true),
        seg(0, 0xffff_ffff, 0x3, true, true),
        seg(ROM_BASE, 0xffff, 0xb, false, false),
        seg(0, 0xffff, 0x3, false, false),
    ]
}

/// Emits WRMSR of `value` to `index` (clobbers EAX, ECX, EDX).
fn wrmsr(a: &mut CodeAssembler, index: u32, value: u64) -> Result<(), QemuError> {
    a.mov(ecx, index)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()?;
    Ok(())
}

/// A 10-byte pseudo-descriptor (limit, 64-bit base), padded to 16.
fn pseudo(limit: u16, base: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..2].copy_from_slice(&limit.to_le_bytes());
    p[2..10].copy_from_slice(&base.to_le_bytes());
    p
}

/// Builds the firmware image that starts `state` (checked against the guest memory `mem`).
pub fn build(state: &CpuState, mem: &GuestMemory) -> Result<Vec<u8>, QemuError> {
    let mode = state.mode();
    let plan = Plan { s: state, mode, mem };
    let s = &state.sregs;
    let r = &state.regs;
    if r.rflags & FORBIDDEN_FLAGS != 0 || r.rflags & rflags::FIXED == 0 {
        return Err(unsupported(format!("RFLAGS {:#x} (TF, VM, RF, VIF, VIP must be clear)", r.rflags)));
    }
    if let Some(k) =
        state.msrs.keys().find(|k| !TRACKED_MSRS.contains(k) && ![msr::FS_BASE, msr::GS_BASE].contains(k))
    {
        return Err(unsupported(format!("MSR {k:#x} in the start state is not one the stub writes")));
    }
    if state.fpu != FxArea::default() {
        return Err(unsupported("x87/SSE start state other than the FNINIT state QEMU resets to"));
    }
    if s.cr4 & (1 << 12) != 0 {
        return Err(unsupported("CR4.LA57 (5-level paging)"));
    }
    let mut rom = vec![0u8; ROM_SIZE];
    for (i, d) in stub_gdt().iter().enumerate() {
        rom[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    let data = DATA_OFF as usize;
    rom[data..data + 16].copy_from_slice(&pseudo(s.gdt.limit, s.gdt.base));
    rom[data + 0x10..data + 0x20].copy_from_slice(&pseudo(s.idt.limit, s.idt.base));
    rom[data + 0x20..data + 0x28].copy_from_slice(&r.rflags.to_le_bytes());

    // Common 32-bit part: segments, PIC mask, reset code cleared, MSRs and control registers.
    let mut a = CodeAssembler::new(32)?;
    a.mov(ax, u32::from(SEL_DATA32))?;
    for sr in [ds, es, ss, fs, gs] {
        a.mov(sr, ax)?;
    }
    a.mov(esp, (ROM_BASE + STUB_SPAN) as u32)?;
    a.mov(al, 0xff)?;
    a.out(0x21, al)?;
    a.out(0xa1, al)?;
    a.cld()?;
    a.mov(edi, RESET_WINDOW.0 as u32)?;
    a.xor(eax, eax)?;
    a.mov(ecx, ((RESET_WINDOW.1 - RESET_WINDOW.0) / 4) as u32)?;
    a.rep().stosd()?;
    for (&index, &value) in state.msrs.iter().filter(|(k, _)| TRACKED_MSRS.contains(k)) {
        wrmsr(&mut a, index, value)?;
    }
    wrmsr(&mut a, msr::EFER, s.efer & !ctrl::EFER_LMA)?;
    if s.cr3 > u64::from(u32::MAX) || s.cr4 > u64::from(u32::MAX) {
        return Err(unsupported(format!("CR3 {:#x} / CR4 {:#x} above 32 bits", s.cr3, s.cr4)));
    }
    // CR2 may be 64 bits wide: long-mode targets write it again from 64-bit code.
    for (cr, value) in [(cr4, s.cr4), (cr3, s.cr3), (cr2, s.cr2)] {
        a.mov(eax, value as u32)?;
        a.mov(cr, eax)?;
    }
    let far32 = |sel: u16, off: u32| {
        let mut b = vec![0xea];
        b.extend(off.to_le_bytes());
        b.extend(sel.to_le_bytes());
        b
    };
    let mut tail16 = None;
    let mut code64 = None;
    match mode {
        CpuMode::Real => {
            check_real(state)?;
            a.mov(esp, (ROM_BASE + DATA_OFF + 0x20) as u32)?;
            a.popfd()?;
            a.db(&far32(SEL_CODE16, TAIL16_OFF as u32))?;
            tail16 = Some(real_tail(state)?);
        }
        CpuMode::Protected32 | CpuMode::Protected16 => {
            if s.cr0 & ctrl::CR0_PG != 0 {
                return Err(unsupported("protected-mode start state with paging on"));
            }
            if s.gdt.base > u64::from(u32::MAX) || s.idt.base > u64::from(u32::MAX) {
                return Err(unsupported("GDT or IDT above 4 GiB outside long mode"));
            }
            check_high_bits(state)?;
            let cpl = start_cpl(state)?;
            for (name, seg) in s.segments() {
                plan.check_segment(name, seg)?;
            }
            let reset = CpuState::reset().sregs;
            let tr = plan.check_system("tr", &s.tr, &reset.tr)?;
            let ldt = plan.check_system("ldtr", &s.ldt, &reset.ldt)?;
            a.mov(eax, s.cr0 as u32)?;
            a.mov(cr0, eax)?;
            a.lgdt(ptr((ROM_BASE + DATA_OFF) as u32))?;
            a.lidt(ptr((ROM_BASE + DATA_OFF + 0x10) as u32))?;
            system_regs32(&mut a, state, tr, ldt)?;
            if cpl == 0 {
                a.mov(esp, (ROM_BASE + DATA_OFF + 0x20) as u32)?;
                a.popfd()?;
            }
            // An outer ring's SS cannot be loaded at CPL 0: IRET loads it (SDM Vol. 2A IRET).
            let loads =
                if cpl == 0 { &[s.ds, s.es, s.fs, s.gs, s.ss][..] } else { &[s.ds, s.es, s.fs, s.gs][..] };
            for (sr, seg) in [ds, es, fs, gs, ss].into_iter().zip(loads) {
                a.mov(ax, u32::from(seg.selector))?;
                a.mov(sr, ax)?;
            }
            for (reg, v) in
                [(eax, r.rax), (ebx, r.rbx), (ecx, r.rcx), (edx, r.rdx), (esi, r.rsi), (edi, r.rdi)]
            {
                a.mov(reg, v as u32)?;
            }
            a.mov(ebp, r.rbp as u32)?;
            if cpl == 0 {
                a.mov(esp, r.rsp as u32)?;
                a.db(&far32(s.cs.selector, r.rip as u32))?;
            } else {
                let frame = [r.rip, u64::from(s.cs.selector), r.rflags, r.rsp, u64::from(s.ss.selector)];
                let at = IRET_FRAME_OFF as usize;
                for (i, v) in frame.iter().enumerate() {
                    rom[at + 4 * i..at + 4 * i + 4].copy_from_slice(&(*v as u32).to_le_bytes());
                }
                a.mov(esp, (ROM_BASE + IRET_FRAME_OFF) as u32)?;
                a.iretd()?;
            }
        }
        CpuMode::Long64 => {
            if s.cr4 & ctrl::CR4_PAE == 0 || s.efer & ctrl::EFER_LME == 0 || s.cr0 & ctrl::CR0_PG == 0 {
                return Err(unsupported("long mode without CR4.PAE, EFER.LME and CR0.PG"));
            }
            let cpl = start_cpl(state)?;
            if s.gdt.base > u64::from(u32::MAX) {
                return Err(unsupported("a GDT above 4 GiB (the stub loads it from compatibility mode)"));
            }
            let canonical = |v: u64| (v as i64) << 16 >> 16 == v as i64;
            let bases =
                [msr::LSTAR, msr::CSTAR, msr::KERNEL_GS_BASE].iter().filter_map(|i| state.msrs.get(i));
            if let Some(v) = bases.chain([&s.fs.base, &s.gs.base]).find(|&&v| !canonical(v)) {
                return Err(unsupported(format!("non-canonical address {v:#x} in an MSR or segment base")));
            }
            check_identity(state, mem)?;
            for (name, seg) in s.segments() {
                plan.check_segment(name, seg)?;
            }
            let reset = CpuState::reset().sregs;
            let tr = plan.check_system("tr", &s.tr, &reset.tr)?;
            let ldt = plan.check_system("ldtr", &s.ldt, &reset.ldt)?;
            a.mov(eax, s.cr0 as u32)?;
            a.mov(cr0, eax)?;
            a.lgdt(ptr((ROM_BASE + DATA_OFF) as u32))?;
            // The stub's 64-bit code runs at CPL 0; an outer ring is entered with IRETQ.
            let stub_cs = if cpl == 0 { s.cs.selector } else { plan.kernel_code64()? };
            a.db(&far32(stub_cs, (ROM_BASE + CODE64_OFF) as u32))?;
            // Walks by the stub set accessed/dirty bits the guest's run would not: the entries
            // for the stub's pages and the GDT are written back at the end (twice: the first
            // pass may walk to reach the tables' own pages, the second hits the TLB only).
            let mut entries = std::collections::BTreeMap::new();
            let gdt_end = s.gdt.base + u64::from(s.gdt.limit);
            let pages = (ROM_BASE..ROM_BASE + STUB_SPAN)
                .step_by(4096)
                .chain((s.gdt.base & !0xfff..=gdt_end).step_by(4096));
            for page in pages {
                entries.extend(walk_entries(mem, s.cr3, page));
            }
            code64 = Some(long_tail(state, cpl, tr, ldt, &entries)?);
        }
        CpuMode::Compatibility | CpuMode::Virtual8086 => {
            return Err(unsupported(format!("{mode:?} start state")));
        }
    }
    let body = a.assemble(ROM_BASE + BODY_OFF)?;
    place(&mut rom, BODY_OFF, &body, CODE64_OFF)?;
    if let Some(c) = code64 {
        place(&mut rom, CODE64_OFF, &c, TAIL16_OFF)?;
    }
    if let Some(c) = tail16 {
        place(&mut rom, TAIL16_OFF, &c, DATA_OFF)?;
    }
    reset_code(&mut rom);
    Ok(rom)
}

fn place(rom: &mut [u8], off: u64, code: &[u8], limit: u64) -> Result<(), QemuError> {
    let (start, end) = (off as usize, off as usize + code.len());
    if end as u64 > limit {
        return Err(QemuError::Asm(format!(
            "stub piece at {off:#x} is {} bytes, past {limit:#x}",
            code.len()
        )));
    }
    rom[start..end].copy_from_slice(code);
    Ok(())
}

/// The real-mode reset code at `0xffff_ff00`: load the stub GDT, set CR0.PE, far jump to the body.
fn reset_code(rom: &mut [u8]) {
    let gdt_pseudo = 0xff40u16;
    let mut c = vec![0xfa]; // cli
                            // o32 lgdt cs:[0xff40]
    c.extend([0x66, 0x2e, 0x0f, 0x01, 0x16]);
    c.extend(gdt_pseudo.to_le_bytes());
    c.extend([0x0f, 0x20, 0xc0]); // mov eax, cr0
    c.extend([0x66, 0x83, 0xc8, 0x01]); // or eax, 1
    c.extend([0x0f, 0x22, 0xc0]); // mov cr0, eax
    c.extend([0x66, 0xea]); // o32 jmp far 0x08:body
    c.extend(((ROM_BASE + BODY_OFF) as u32).to_le_bytes());
    c.extend(SEL_CODE32.to_le_bytes());
    rom[RESET_CODE_OFF..RESET_CODE_OFF + c.len()].copy_from_slice(&c);
    let p = RESET_CODE_OFF + 0x40;
    rom[p..p + 2].copy_from_slice(&((stub_gdt().len() * 8 - 1) as u16).to_le_bytes());
    rom[p + 2..p + 6].copy_from_slice(&(ROM_BASE as u32).to_le_bytes());
    // Reset vector (IP 0xfff0 with CS base 0xffff_0000): jmp near 0xff00.
    let v = ROM_SIZE - 16;
    let rel = 0xff00u16.wrapping_sub(0xfff3);
    rom[v] = 0xe9;
    rom[v + 1..v + 3].copy_from_slice(&rel.to_le_bytes());
}

/// TR and LDTR for 32-bit targets: mark the TSS available, LTR, restore the access byte; LLDT.
fn system_regs32(
    a: &mut CodeAssembler,
    s: &CpuState,
    tr: Option<(u64, u8)>,
    ldt: Option<(u64, u8)>,
) -> Result<(), QemuError> {
    if let Some((at, access)) = tr {
        a.mov(byte_ptr(at as u32), u32::from(access & !0x02))?;
        a.mov(ax, u32::from(s.sregs.tr.selector))?;
        a.ltr(ax)?;
        a.mov(byte_ptr(at as u32), u32::from(access))?;
    }
    if ldt.is_some() {
        a.mov(ax, u32::from(s.sregs.ldt.selector))?;
        a.lldt(ax)?;
    }
    Ok(())
}

/// 16-bit code at `ROM_BASE + TAIL16_OFF`: 16-bit data segments, guest GDTR/IDTR and CR0
/// (leaving protected mode), real-mode segment loads, GPRs, far jump.
fn real_tail(s: &CpuState) -> Result<Vec<u8>, QemuError> {
    let (r, sr) = (&s.regs, &s.sregs);
    let mut a = CodeAssembler::new(16)?;
    a.mov(ax, u32::from(SEL_DATA16))?;
    for seg in [ds, es, fs, gs, ss] {
        a.mov(seg, ax)?;
    }
    // o32 lgdt cs:[DATA_OFF]; o32 lidt cs:[DATA_OFF + 0x10]
    for (reg, off) in [(0x16u8, DATA_OFF as u16), (0x1e, DATA_OFF as u16 + 0x10)] {
        a.db(&[0x66, 0x2e, 0x0f, 0x01, reg])?;
        a.db(&off.to_le_bytes())?;
    }
    a.mov(eax, sr.cr0 as u32)?;
    a.mov(cr0, eax)?;
    for (seg, v) in [(ds, sr.ds), (es, sr.es), (fs, sr.fs), (gs, sr.gs), (ss, sr.ss)] {
        a.mov(ax, u32::from(v.selector))?;
        a.mov(seg, ax)?;
    }
    for (reg, v) in [
        (eax, r.rax),
        (ebx, r.rbx),
        (ecx, r.rcx),
        (edx, r.rdx),
        (esi, r.rsi),
        (edi, r.rdi),
        (ebp, r.rbp),
        (esp, r.rsp),
    ] {
        a.mov(reg, v as u32)?;
    }
    let mut far = vec![0xea];
    far.extend((r.rip as u16).to_le_bytes());
    far.extend(sr.cs.selector.to_le_bytes());
    a.db(&far)?;
    Ok(a.assemble(TAIL16_OFF)?)
}

/// 64-bit code at `ROM_BASE + CODE64_OFF`, entered with the guest's CS.
fn long_tail(
    s: &CpuState,
    cpl: u8,
    tr: Option<(u64, u8)>,
    ldt: Option<(u64, u8)>,
    entries: &std::collections::BTreeMap<u64, u64>,
) -> Result<Vec<u8>, QemuError> {
    let (r, sr) = (&s.regs, &s.sregs);
    let mut a = CodeAssembler::new(64)?;
    let (mut flags, mut target, mut frame) = (a.create_label(), a.create_label(), a.create_label());
    a.mov(rax, ROM_BASE + DATA_OFF)?;
    a.lgdt(ptr(rax))?;
    a.lidt(ptr(rax + 0x10))?;
    if let Some((at, access)) = tr {
        a.mov(rbx, at)?;
        a.mov(byte_ptr(rbx), u32::from(access & !0x02))?;
        a.mov(ax, u32::from(sr.tr.selector))?;
        a.ltr(ax)?;
        a.mov(byte_ptr(rbx), u32::from(access))?;
    }
    if ldt.is_some() {
        a.mov(ax, u32::from(sr.ldt.selector))?;
        a.lldt(ax)?;
    }
    a.mov(rax, sr.cr8)?;
    a.mov(cr8, rax)?;
    a.mov(rax, sr.cr2)?;
    a.mov(cr2, rax)?;
    // An outer ring's SS cannot be loaded at CPL 0: IRETQ loads it (SDM Vol. 2A IRET).
    let loads =
        if cpl == 0 { &[sr.ds, sr.es, sr.fs, sr.gs, sr.ss][..] } else { &[sr.ds, sr.es, sr.fs, sr.gs][..] };
    for (seg, v) in [ds, es, fs, gs, ss].into_iter().zip(loads) {
        a.mov(ax, u32::from(v.selector))?;
        a.mov(seg, ax)?;
    }
    for (seg, index) in [(sr.fs, msr::FS_BASE), (sr.gs, msr::GS_BASE)] {
        if !seg.unusable || seg.base != 0 {
            a.mov(ecx, index)?;
            a.mov(eax, seg.base as u32)?;
            a.mov(edx, (seg.base >> 32) as u32)?;
            a.wrmsr()?;
        }
    }
    for _pass in 0..2 {
        for (&at, &value) in entries {
            a.mov(rbx, at)?;
            a.mov(rax, value)?;
            a.mov(qword_ptr(rbx), rax)?;
        }
    }
    if cpl == 0 {
        a.lea(rsp, ptr(flags))?;
        a.popfq()?;
    }
    for (reg, v) in [
        (rax, r.rax),
        (rbx, r.rbx),
        (rcx, r.rcx),
        (rdx, r.rdx),
        (rsi, r.rsi),
        (rdi, r.rdi),
        (rbp, r.rbp),
        (r8, r.r8),
        (r9, r.r9),
        (r10, r.r10),
        (r11, r.r11),
        (r12, r.r12),
        (r13, r.r13),
        (r14, r.r14),
        (r15, r.r15),
    ] {
        a.mov(reg, v)?;
    }
    if cpl == 0 {
        a.mov(rsp, r.rsp)?;
        a.jmp(qword_ptr(target))?;
    } else {
        a.lea(rsp, ptr(frame))?;
        a.iretq()?;
    }
    a.set_label(&mut flags)?;
    a.dq(&[r.rflags])?;
    a.set_label(&mut target)?;
    a.dq(&[r.rip])?;
    a.set_label(&mut frame)?;
    a.dq(&[r.rip, u64::from(sr.cs.selector), r.rflags, r.rsp, u64::from(sr.ss.selector)])?;
    Ok(a.assemble(ROM_BASE + CODE64_OFF)?)
}

#[cfg(test)]
mod tests {
    use duet_core::vm_memory::{Bytes, GuestAddress};
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    use super::*;

    fn guest_memory(size: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn reset_vector_reaches_the_body_in_protected_mode() {
        let mem = guest_memory(0x10_0000);
        let mut s = CpuState::reset();
        s.sregs.cs = Segment::real_mode(0, true);
        s.regs.rip = 0x7c00;
        let rom = build(&s, &mem).unwrap();
        assert_eq!(rom.len(), ROM_SIZE);
        // SDM Vol. 3A §10.1.4: the first instruction is at FFFF_FFF0 (CS base FFFF_0000, IP FFF0).
        let mut d = Decoder::with_ip(16, &rom[ROM_SIZE - 16..], 0xfff0, DecoderOptions::NONE);
        let jmp = d.decode();
        assert_eq!((jmp.mnemonic(), jmp.near_branch_target()), (Mnemonic::Jmp, 0xff00));
        let mut d = Decoder::with_ip(16, &rom[RESET_CODE_OFF..], 0xff00, DecoderOptions::NONE);
        let m: Vec<Mnemonic> = (0..6).map(|_| d.decode().mnemonic()).collect();
        assert_eq!(
            m,
            [Mnemonic::Cli, Mnemonic::Lgdt, Mnemonic::Mov, Mnemonic::Or, Mnemonic::Mov, Mnemonic::Jmp]
        );
        // The stub's code never lies in the guest-visible low alias (the last 128 KiB).
        assert!(rom[..ROM_SIZE - 0x2_0000].iter().any(|&b| b != 0));
        assert!(rom[ROM_SIZE - 0x2_0000..RESET_CODE_OFF].iter().all(|&b| b == 0));
    }

    #[test]
    fn four_level_walk_follows_large_pages_and_stops_at_holes() {
        let mem = guest_memory(0x10_0000);
        let w = |a: u64, v: u64| mem.write_slice(&v.to_le_bytes(), GuestAddress(a)).unwrap();
        // PML4[0] -> PDPT at 0x2000; PDPT[3] -> PD at 0x3000; PD[511] = 2 MiB page at 0xffe0_0000.
        w(0x1000, 0x2003);
        w(0x2000 + 3 * 8, 0x3003);
        w(0x3000 + 511 * 8, 0xffe0_0000 | 0x83);
        assert_eq!(translate4(&mem, 0x1000, 0xffff_f123), Some((0xffff_f123, true, true)));
        assert_eq!(translate4(&mem, 0x1000, 0xffc0_0000), None);
        // A read-only, no-execute PDPTE is reported so.
        w(0x2000 + 3 * 8, 0x3001 | (1 << 63));
        assert_eq!(translate4(&mem, 0x1000, 0xfffc_0000), Some((0xfffc_0000, false, false)));
    }
}
