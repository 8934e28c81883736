//! Neutral state ↔ kvm-bindings: the only place that knows both layouts.
//!
//! One block per direction: `*_from_kvm` builds duet-core types from what KVM reports,
//! `*_to_kvm` builds what KVM is given.

use duet_core::state::{CpuState, DescriptorTable, FxArea, Regs, Segment, SystemRegs};
use duet_core::{CpuidEntry, CpuidProfile};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
};

// FXSAVE image offsets in the 64-bit layout (REX.W FXSAVE64), which is what the Linux
// kernel keeps and what kvm_fpu's 64-bit last_ip/last_dp come from
// (SDM Vol. 1 §10.5.1 Table 10-2; Vol. 2A FXSAVE, 64-bit layout).
const FX_FCW: usize = 0;
const FX_FSW: usize = 2;
const FX_FTW: usize = 4;
const FX_FOP: usize = 6;
const FX_FIP: usize = 8;
const FX_FDP: usize = 16;
const FX_MXCSR: usize = 24;
const FX_ST0: usize = 32;
const FX_XMM0: usize = 160;

// ---- kvm-bindings → neutral -------------------------------------------------------------

/// GPRs, RIP and RFLAGS as KVM reports them.
pub fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// A segment register's visible and hidden parts.
pub fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

/// GDTR or IDTR.
pub fn dtable_from_kvm(t: &kvm_dtable) -> DescriptorTable {
    DescriptorTable { base: t.base, limit: t.limit }
}

/// Segments, descriptor tables, control registers, EFER and APIC base.
pub fn sregs_from_kvm(s: &kvm_sregs) -> SystemRegs {
    SystemRegs {
        cs: segment_from_kvm(&s.cs),
        ds: segment_from_kvm(&s.ds),
        es: segment_from_kvm(&s.es),
        fs: segment_from_kvm(&s.fs),
        gs: segment_from_kvm(&s.gs),
        ss: segment_from_kvm(&s.ss),
        tr: segment_from_kvm(&s.tr),
        ldt: segment_from_kvm(&s.ldt),
        gdt: dtable_from_kvm(&s.gdt),
        idt: dtable_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// The x87/SSE state in FXSAVE layout. MXCSR_MASK (bytes 28–31) describes the CPU, not its
/// state; kvm_fpu does not carry it and it stays zero, as in [`FxArea::default`]. KVM's
/// KVM_GET_FPU leaves `mxcsr` zero: the vCPU overlays MXCSR from KVM_GET_XSAVE.
pub fn fpu_from_kvm(f: &kvm_fpu) -> FxArea {
    let mut a = [0u8; 512];
    a[FX_FCW..FX_FCW + 2].copy_from_slice(&f.fcw.to_le_bytes());
    a[FX_FSW..FX_FSW + 2].copy_from_slice(&f.fsw.to_le_bytes());
    // kvm_fpu.ftwx is already the abridged tag byte FXSAVE stores.
    a[FX_FTW] = f.ftwx;
    a[FX_FOP..FX_FOP + 2].copy_from_slice(&f.last_opcode.to_le_bytes());
    a[FX_FIP..FX_FIP + 8].copy_from_slice(&f.last_ip.to_le_bytes());
    a[FX_FDP..FX_FDP + 8].copy_from_slice(&f.last_dp.to_le_bytes());
    a[FX_MXCSR..FX_MXCSR + 4].copy_from_slice(&f.mxcsr.to_le_bytes());
    for (slot, reg) in a[FX_ST0..FX_XMM0].chunks_exact_mut(16).zip(&f.fpr) {
        slot.copy_from_slice(reg);
    }
    for (slot, reg) in a[FX_XMM0..FX_XMM0 + 256].chunks_exact_mut(16).zip(&f.xmm) {
        slot.copy_from_slice(reg);
    }
    FxArea(a)
}

/// KVM's supported-CPUID table as a profile.
pub fn cpuid_from_kvm(entries: &[kvm_cpuid_entry2]) -> CpuidProfile {
    CpuidProfile {
        entries: entries
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                indexed: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect(),
    }
}

// ---- neutral → kvm-bindings -------------------------------------------------------------

/// GPRs, RIP and RFLAGS for KVM_SET_REGS.
pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

/// A segment register for KVM_SET_SREGS.
pub fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

/// GDTR or IDTR for KVM_SET_SREGS.
pub fn dtable_to_kvm(t: &DescriptorTable) -> kvm_dtable {
    kvm_dtable { base: t.base, limit: t.limit, padding: [0; 3] }
}

/// System registers for KVM_SET_SREGS; `interrupt_bitmap` is KVM's queued-interrupt bitmap,
/// which the neutral state does not carry (pass what KVM_GET_SREGS returned to keep it).
pub fn sregs_to_kvm(s: &SystemRegs, interrupt_bitmap: [u64; 4]) -> kvm_sregs {
    kvm_sregs {
        cs: segment_to_kvm(&s.cs),
        ds: segment_to_kvm(&s.ds),
        es: segment_to_kvm(&s.es),
        fs: segment_to_kvm(&s.fs),
        gs: segment_to_kvm(&s.gs),
        ss: segment_to_kvm(&s.ss),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldt),
        gdt: dtable_to_kvm(&s.gdt),
        idt: dtable_to_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap,
    }
}

/// The x87/SSE state for KVM_SET_FPU, read from the FXSAVE image.
pub fn fpu_to_kvm(a: &FxArea) -> kvm_fpu {
    let b = &a.0;
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    let reg = |o: usize| std::array::from_fn::<u8, 16, _>(|i| b[o + i]);
    kvm_fpu {
        fpr: std::array::from_fn(|i| reg(FX_ST0 + 16 * i)),
        fcw: u16_at(FX_FCW),
        fsw: u16_at(FX_FSW),
        ftwx: b[FX_FTW],
        pad1: 0,
        last_opcode: u16_at(FX_FOP),
        last_ip: u64_at(FX_FIP),
        last_dp: u64_at(FX_FDP),
        xmm: std::array::from_fn(|i| reg(FX_XMM0 + 16 * i)),
        mxcsr: u32_at(FX_MXCSR),
        pad2: 0,
    }
}

/// A profile as KVM_SET_CPUID2 entries.
pub fn cpuid_to_kvm(p: &CpuidProfile) -> Vec<kvm_cpuid_entry2> {
    p.entries
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: if e.indexed { KVM_CPUID_FLAG_SIGNIFCANT_INDEX } else { 0 },
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect()
}

/// The parts of a [`CpuState`] KVM_SET_REGS/SREGS/FPU take, in one place for `set_state`.
pub fn state_to_kvm(s: &CpuState, interrupt_bitmap: [u64; 4]) -> (kvm_regs, kvm_sregs, kvm_fpu) {
    (regs_to_kvm(&s.regs), sregs_to_kvm(&s.sregs, interrupt_bitmap), fpu_to_kvm(&s.fpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value for every byte that differs from its neighbours, so a swapped field shows.
    fn pattern(seed: u64) -> u64 {
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x0123_4567_89ab_cdef
    }

    #[test]
    fn regs_round_trip() {
        let mut r = Regs::default();
        let g: [u64; 16] = std::array::from_fn(|i| pattern(i as u64));
        r.set_gprs(&g);
        r.rip = pattern(16);
        r.rflags = pattern(17);
        let k = regs_to_kvm(&r);
        // RSP is encoding index 4 (SDM Vol. 2A §2.1.5 Table 2-2): the field must land in kvm rsp.
        assert_eq!(k.rsp, pattern(4));
        assert_eq!(k.r15, pattern(15));
        assert_eq!(regs_from_kvm(&k), r);
    }

    #[test]
    fn sregs_round_trip_keeps_every_segment_field() {
        let code64 = Segment::from_descriptor(0x8, 0x00af_9b00_0000_ffff);
        let mut s = SystemRegs::reset();
        s.cs = code64;
        s.ss = Segment { unusable: true, avl: true, ..Segment::real_mode(0x10, false) };
        s.gdt = DescriptorTable { base: 0x1000, limit: 0x37 };
        s.idt = DescriptorTable { base: 0x2000, limit: 0xfff };
        (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer) = (0x8000_0011, 0xdead, 0x10000, 0x20, 3, 0x500);
        let k = sregs_to_kvm(&s, [1, 2, 3, 4]);
        assert_eq!((k.cs.l, k.cs.db, k.cs.type_, k.cs.selector), (1, 0, 0xb, 0x8));
        assert_eq!((k.ss.unusable, k.ss.avl, k.ss.base), (1, 1, 0x100));
        assert_eq!(k.interrupt_bitmap, [1, 2, 3, 4]);
        assert_eq!(sregs_from_kvm(&k), s);
    }

    #[test]
    fn fpu_lands_at_fxsave_offsets_and_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x027f,
            fsw: 0x3800,
            ftwx: 0x81,
            last_opcode: 0x05d9,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99aa_bbcc_ddee_ff00,
            mxcsr: 0x1fa0,
            ..Default::default()
        };
        for i in 0..8 {
            f.fpr[i] = [i as u8 + 1; 16];
        }
        for i in 0..16 {
            f.xmm[i] = [0x40 + i as u8; 16];
        }
        let a = fpu_from_kvm(&f);
        // Offsets from SDM Vol. 1 Table 10-2 (64-bit FXSAVE layout): FCW 0, FSW 2, FTW 4,
        // FOP 6, FIP 8, FDP 16, MXCSR 24, ST0 32, XMM0 160.
        assert_eq!(a.fcw(), 0x027f);
        assert_eq!(a.0[2..4], [0x00, 0x38]);
        assert_eq!(a.0[4], 0x81);
        assert_eq!(a.0[6..8], [0xd9, 0x05]);
        assert_eq!(a.0[8], 0x88);
        assert_eq!(a.0[23], 0x99);
        assert_eq!(a.mxcsr(), 0x1fa0);
        assert_eq!(a.0[32 + 16 * 7], 8);
        assert_eq!(a.xmm(15), u128::from_le_bytes([0x4f; 16]));
        assert_eq!(a.0[416..], [0u8; 96]);
        let back = fpu_to_kvm(&a);
        assert_eq!(back, f);
        assert_eq!(fpu_from_kvm(&back), a);
    }

    #[test]
    fn default_fx_area_is_fninit_state_in_kvm_terms() {
        // SDM Vol. 1 §8.1.5 / FNINIT: FCW = 0x037F; MXCSR after reset = 0x1F80 (§10.2.3.1).
        let k = fpu_to_kvm(&FxArea::default());
        assert_eq!((k.fcw, k.fsw, k.ftwx, k.mxcsr), (0x037f, 0, 0, 0x1f80));
    }

    #[test]
    fn cpuid_round_trip_keeps_the_indexed_flag() {
        let p = CpuidProfile::baseline();
        let k = cpuid_to_kvm(&p);
        let leaf7 = k.iter().find(|e| e.function == 7).map(|e| e.flags);
        assert_eq!(leaf7, Some(KVM_CPUID_FLAG_SIGNIFCANT_INDEX));
        assert_eq!(cpuid_from_kvm(&k), p);
    }
}
