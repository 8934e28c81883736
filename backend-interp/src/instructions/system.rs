//! System instructions: HLT, CPUID, RDMSR/WRMSR, RDTSC, LGDT/LIDT/SGDT/SIDT, LTR/LLDT/STR/SLDT,
//! MOV to/from control registers, INVLPG, CLTS, WBINVD/INVD, SWAPGS, SMSW/LMSW.

use duet_core::cpuid::ext_leaf1;
use duet_core::state::{ctrl, msr};
use duet_core::Segment;
use iced_x86::{Instruction, Mnemonic, Register};

use super::form;
use super::stack::opsize;
use crate::cpu::{canonical, fault_code, gp, mask, ud, vector, Cpu, Flow, Post};
use crate::operand::addr_bytes;

/// PAT after RESET (SDM Vol. 3A §13.12.4).
pub(crate) const PAT_RESET: u64 = 0x0007_0406_0007_0406;

/// Instructions that require CPL 0 (SDM Vol. 3A §5.9).
fn privileged(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Hlt
            | Mnemonic::Rdmsr
            | Mnemonic::Wrmsr
            | Mnemonic::Lgdt
            | Mnemonic::Lidt
            | Mnemonic::Ltr
            | Mnemonic::Lldt
            | Mnemonic::Invlpg
            | Mnemonic::Clts
            | Mnemonic::Wbinvd
            | Mnemonic::Invd
            | Mnemonic::Swapgs
            | Mnemonic::Lmsw
    )
}

/// Executes a system instruction.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    if privileged(m) && cpu.cpl() != 0 {
        return Err(gp(0));
    }
    match m {
        Mnemonic::Hlt => cpu.post = Some(Post::Hlt),
        Mnemonic::Cpuid => {
            let r = cpu.cpuid.lookup(cpu.gpr_sized(0, 4) as u32, cpu.gpr_sized(1, 4) as u32);
            for (reg, v) in [(0, r[0]), (3, r[1]), (1, r[2]), (2, r[3])] {
                cpu.set_gpr_sized(reg, 4, u64::from(v));
            }
        }
        Mnemonic::Rdtsc => {
            // CR4.TSD restricts RDTSC to CPL 0 (SDM Vol. 2B RDTSC).
            if cpu.sregs.cr4 & 4 != 0 && cpu.cpl() != 0 {
                return Err(gp(0));
            }
            let t = cpu.tsc();
            cpu.set_gpr_sized(0, 4, t & 0xffff_ffff);
            cpu.set_gpr_sized(2, 4, t >> 32);
        }
        Mnemonic::Rdmsr => {
            let v = cpu.rdmsr(cpu.gpr_sized(1, 4) as u32)?;
            cpu.set_gpr_sized(0, 4, v & 0xffff_ffff);
            cpu.set_gpr_sized(2, 4, v >> 32);
        }
        Mnemonic::Wrmsr => {
            let v = (cpu.gpr_sized(2, 4) << 32) | cpu.gpr_sized(0, 4);
            cpu.wrmsr(cpu.gpr_sized(1, 4) as u32, v)?;
        }
        Mnemonic::Lgdt | Mnemonic::Lidt => {
            if !Cpu::is_mem(ins, 0) {
                return Err(ud());
            }
            let (seg, ea) = cpu.mem_addr(ins, 0);
            let am = mask(addr_bytes(ins, cpu.bitness()));
            let base_bytes = if cpu.mode64() { 8 } else { 4 };
            // The pseudo-descriptor is one operand: all of it must lie within the segment, so a
            // real-mode one at offset 0xFFFE is #SS/#GP rather than wrapping (SDM Vol. 2A
            // LGDT/LIDT, Real-Address Mode Exceptions; KVM agrees).
            cpu.seg_linear(seg, ea, 2 + base_bytes, false)?;
            let limit = cpu.read_mem(seg, ea, 2)? as u16;
            let mut base = cpu.read_mem(seg, ea.wrapping_add(2) & am, base_bytes)?;
            if cpu.mode64() && !canonical(base) {
                return Err(gp(0));
            }
            // 16-bit operand size loads a 24-bit base (SDM Vol. 2A LGDT/LIDT).
            if opsize(ins, cpu) == 2 && !cpu.mode64() {
                base &= 0xff_ffff;
            }
            let t = if m == Mnemonic::Lgdt { &mut cpu.sregs.gdt } else { &mut cpu.sregs.idt };
            t.base = base;
            t.limit = limit;
        }
        Mnemonic::Sgdt | Mnemonic::Sidt => {
            if !Cpu::is_mem(ins, 0) {
                return Err(ud());
            }
            let t = if m == Mnemonic::Sgdt { cpu.sregs.gdt } else { cpu.sregs.idt };
            let (seg, ea) = cpu.mem_addr(ins, 0);
            let am = mask(addr_bytes(ins, cpu.bitness()));
            let base_bytes = if cpu.mode64() { 8 } else { 4 };
            // Check both parts before writing either.
            cpu.seg_linear(seg, ea, 2 + base_bytes, true)?;
            cpu.write_mem(seg, ea, 2, u64::from(t.limit))?;
            cpu.write_mem(seg, ea.wrapping_add(2) & am, base_bytes, t.base)?;
        }
        Mnemonic::Ltr | Mnemonic::Lldt => {
            if !cpu.protected() || cpu.v86() {
                return Err(ud());
            }
            let sel = cpu.read_op(ins, 0)? as u16;
            cpu.load_system_seg(m == Mnemonic::Ltr, sel)?;
        }
        Mnemonic::Str | Mnemonic::Sldt => {
            if !cpu.protected() || cpu.v86() {
                return Err(ud());
            }
            let s = if m == Mnemonic::Str { cpu.sregs.tr.selector } else { cpu.sregs.ldt.selector };
            cpu.write_op(ins, 0, u64::from(s))?;
        }
        Mnemonic::Smsw => {
            let v = cpu.sregs.cr0;
            cpu.write_op(ins, 0, v)?;
        }
        Mnemonic::Lmsw => {
            // LMSW loads PE, MP, EM, TS; it can set PE but not clear it (SDM Vol. 2A LMSW).
            let v = cpu.read_op(ins, 0)?;
            let cr0 = cpu.sregs.cr0;
            let new = (cr0 & !0xe) | (v & 0xe) | ((v | cr0) & 1);
            cpu.set_cr(0, new)?;
        }
        Mnemonic::Invlpg => {
            if !Cpu::is_mem(ins, 0) {
                return Err(ud());
            }
            let (seg, ea) = cpu.mem_addr(ins, 0);
            let base = match cpu.seg(seg) {
                Some(s) if !cpu.mode64() || matches!(seg, Register::FS | Register::GS) => s.base,
                _ => 0,
            };
            cpu.tlb.invlpg(base.wrapping_add(ea));
        }
        Mnemonic::Clts => cpu.sregs.cr0 &= !ctrl::CR0_TS,
        Mnemonic::Wbinvd | Mnemonic::Invd => {}
        Mnemonic::Swapgs => {
            if !cpu.mode64() {
                return Err(ud());
            }
            let k = cpu.msrs.get(&msr::KERNEL_GS_BASE).copied().unwrap_or(0);
            cpu.msrs.insert(msr::KERNEL_GS_BASE, cpu.sregs.gs.base);
            cpu.sregs.gs.base = k;
        }
        _ => return Err(form(ins)),
    }
    Ok(())
}

/// MOV to or from CR0, CR2, CR3, CR4 or CR8 (SDM Vol. 2B MOV—Move to/from Control Registers).
pub(crate) fn mov_cr(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let to_cr = ins.op_register(0).is_cr();
    let cr = if to_cr { ins.op_register(0) } else { ins.op_register(1) };
    let n = cr as u32 - Register::CR0 as u32;
    if !matches!(n, 0 | 2 | 3 | 4 | 8) {
        return Err(ud());
    }
    if cpu.cpl() != 0 {
        return Err(gp(0));
    }
    if to_cr {
        let v = cpu.read_op(ins, 1)?;
        cpu.set_cr(n, v)
    } else {
        let v = match n {
            0 => cpu.sregs.cr0,
            2 => cpu.sregs.cr2,
            3 => cpu.sregs.cr3,
            4 => cpu.sregs.cr4,
            _ => cpu.sregs.cr8,
        };
        cpu.write_op(ins, 0, v)
    }
}

/// MOV to or from DR0–DR7 (SDM Vol. 2B MOV—Move to/from Debug Registers). The registers are
/// read back as written (with the fixed bits); DR0–DR3 with DR7 raise instruction breakpoints only,
/// no data, I/O or DR7.GD traps.
pub(crate) fn mov_dr(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let to_dr = ins.op_register(0).is_dr();
    let dr = if to_dr { ins.op_register(0) } else { ins.op_register(1) };
    let mut n = dr as u32 - Register::DR0 as u32;
    if n > 7 {
        return Err(ud());
    }
    // DR4/DR5 alias DR6/DR7 unless CR4.DE makes them #UD.
    if n == 4 || n == 5 {
        if cpu.sregs.cr4 & 8 != 0 {
            return Err(ud());
        }
        n += 2;
    }
    if cpu.cpl() != 0 {
        return Err(gp(0));
    }
    let slot = if n >= 6 { n as usize - 2 } else { n as usize };
    if to_dr {
        let v = cpu.read_op(ins, 1)?;
        let v = match n {
            // DR6/DR7 bits 63:32 are reserved: #GP in 64-bit mode (SDM Vol. 3A §18.2.4–18.2.6).
            6 | 7 if v >> 32 != 0 => return Err(gp(0)),
            6 => (v & 0xe00f) | 0xffff_0ff0,
            7 => (v & 0xffff_23ff) | 0x400,
            _ => v,
        };
        if let Some(d) = cpu.dr.get_mut(slot) {
            *d = v;
        }
        Ok(())
    } else {
        let v = cpu.dr.get(slot).copied().unwrap_or(0);
        cpu.write_op(ins, 0, v)
    }
}

/// CR4 bits the interpreter always accepts: VME…OSXMMEXCPT (bits 0–10).
const CR4_VALID: u64 = 0x7ff;
/// CR0 bits that exist; writes to other bits of 31:0 are ignored, bits 63:32 fault.
const CR0_VALID: u64 = 0xe005_003f;

impl Cpu {
    /// Writes control register `n` with the reserved-bit and mode checks of SDM Vol. 3A §2.5 and
    /// the IA-32e activation of §10.8.5.
    pub fn set_cr(&mut self, n: u32, v: u64) -> Flow {
        match n {
            0 => {
                if v >> 32 != 0 {
                    return Err(gp(0));
                }
                let new = (v & CR0_VALID) | ctrl::CR0_ET;
                let old = self.sregs.cr0;
                let pg = new & ctrl::CR0_PG != 0;
                if (pg && new & ctrl::CR0_PE == 0) || (new & ctrl::CR0_NW != 0 && new & ctrl::CR0_CD == 0) {
                    return Err(gp(0));
                }
                let mut efer = self.sregs.efer;
                if pg && old & ctrl::CR0_PG == 0 && efer & ctrl::EFER_LME != 0 {
                    if self.sregs.cr4 & ctrl::CR4_PAE == 0 || self.sregs.cs.l {
                        return Err(gp(0));
                    }
                    efer |= ctrl::EFER_LMA;
                }
                if !pg && old & ctrl::CR0_PG != 0 && efer & ctrl::EFER_LMA != 0 {
                    if self.mode64() {
                        return Err(gp(0));
                    }
                    efer &= !ctrl::EFER_LMA;
                }
                // SDM Vol. 3A §4.4.1: a MOV to CR0 that leaves PAE paging on and changes CD, NW or PG
                // loads the PDPTE registers (#GP(0), nothing changed, on a reserved bit).
                let pae = pg && self.sregs.cr4 & ctrl::CR4_PAE != 0 && efer & ctrl::EFER_LMA == 0;
                if pae && (old ^ new) & (ctrl::CR0_CD | ctrl::CR0_NW | ctrl::CR0_PG) != 0 {
                    self.pdpte = self.read_pdptes(self.sregs.cr3)?;
                }
                self.sregs.cr0 = new;
                self.sregs.efer = efer;
                if (old ^ new) & (ctrl::CR0_PG | ctrl::CR0_WP | ctrl::CR0_PE) != 0 {
                    self.tlb.flush();
                }
            }
            2 => self.sregs.cr2 = v,
            3 => {
                if self.long_mode() && v >> self.maxphyaddr != 0 {
                    return Err(gp(0));
                }
                // Under PAE paging the PDPTEs come from the new CR3 (SDM Vol. 3A §4.4.1).
                if self.pae_paging() {
                    self.pdpte = self.read_pdptes(v)?;
                }
                self.sregs.cr3 = if self.long_mode() { v } else { v & 0xffff_ffff };
                // Global translations survive a CR3 write (SDM Vol. 3A §4.10.4.1).
                self.tlb.flush_nonglobal();
            }
            4 => {
                // FSGSBASE and OSXSAVE exist only where CPUID enumerates them (SDM Vol. 3A §2.5).
                let mut valid = CR4_VALID;
                if self.cpuid.has_leaf7_ebx(duet_core::cpuid::leaf7_ebx::FSGSBASE) {
                    valid |= super::ext::CR4_FSGSBASE;
                }
                if self.cpuid.has_leaf1_ecx(duet_core::cpuid::leaf1_ecx::XSAVE) {
                    valid |= super::ext::CR4_OSXSAVE;
                }
                if v & !valid != 0 || (self.long_mode() && v & ctrl::CR4_PAE == 0) {
                    return Err(gp(0));
                }
                let old = self.sregs.cr4;
                // A MOV to CR4 that leaves PAE paging on and changes PAE, PGE or PSE reloads the
                // PDPTEs (SDM Vol. 3A §4.4.1).
                let pae = self.paging() && v & ctrl::CR4_PAE != 0 && !self.long_mode();
                if pae && (old ^ v) & (ctrl::CR4_PAE | ctrl::CR4_PGE | ctrl::CR4_PSE) != 0 {
                    self.pdpte = self.read_pdptes(self.sregs.cr3)?;
                }
                self.sregs.cr4 = v;
                if (old ^ v) & (ctrl::CR4_PSE | ctrl::CR4_PAE | ctrl::CR4_PGE) != 0 {
                    self.tlb.flush();
                }
            }
            8 => {
                if v >> 4 != 0 {
                    return Err(gp(0));
                }
                self.sregs.cr8 = v;
            }
            _ => return Err(ud()),
        }
        Ok(())
    }

    /// LTR / LLDT: loads TR (available TSS, marked busy) or LDTR (SDM Vol. 2A LTR, LLDT).
    pub(crate) fn load_system_seg(&mut self, tr: bool, sel: u16) -> Flow {
        let err = u32::from(sel & 0xfffc);
        if sel & 0xfffc == 0 {
            if tr {
                return Err(gp(0));
            }
            self.sregs.ldt = Segment { selector: sel, unusable: true, ..Segment::default() };
            return Ok(());
        }
        if sel & 4 != 0 {
            return Err(gp(err));
        }
        let (raw, addr) = self.descriptor(sel)?;
        let mut d = Segment::from_descriptor(sel, raw);
        let lm = self.long_mode();
        let type_ok = if tr { d.type_ == 9 || (!lm && d.type_ == 1) } else { d.type_ == 2 };
        if d.s || !type_ok {
            return Err(gp(err));
        }
        if !d.present {
            return Err(fault_code(vector::NP, err));
        }
        if lm {
            // 16-byte system descriptors in IA-32e mode: bits 63:32 of the base follow.
            if u64::from(sel & 0xfff8) + 15 > u64::from(self.sregs.gdt.limit) {
                return Err(gp(err));
            }
            let hi = self.read_lin_u(addr.wrapping_add(8), 8, true)?;
            d.base |= (hi & 0xffff_ffff) << 32;
            if !canonical(d.base) {
                return Err(gp(err));
            }
        }
        if tr {
            // Mark the descriptor busy (type bit 1) in the GDT.
            let b = ((raw >> 40) as u8) | 2;
            self.write_lin(addr.wrapping_add(5), &[b], true)?;
            d.type_ |= 2;
            self.sregs.tr = d;
        } else {
            self.sregs.ldt = d;
        }
        Ok(())
    }

    /// RDMSR: the MSRs the interpreter models; any other index is #GP(0).
    pub fn rdmsr(&self, idx: u32) -> Flow<u64> {
        Ok(match idx {
            msr::TSC => self.tsc(),
            msr::APIC_BASE => self.sregs.apic_base,
            msr::EFER => self.sregs.efer,
            msr::FS_BASE => self.sregs.fs.base,
            msr::GS_BASE => self.sregs.gs.base,
            msr::PAT => self.msrs.get(&idx).copied().unwrap_or(PAT_RESET),
            msr::STAR
            | msr::LSTAR
            | msr::CSTAR
            | msr::SFMASK
            | msr::KERNEL_GS_BASE
            | msr::SYSENTER_CS
            | msr::SYSENTER_ESP
            | msr::SYSENTER_EIP
            | msr::TSC_AUX => self.msrs.get(&idx).copied().unwrap_or(0),
            _ => return Err(gp(0)),
        })
    }

    /// What storage MSR `idx` holds after `v` is put in it (by WRMSR or by loading a state):
    /// an AMD CPU's SYSENTER_EIP, SYSENTER_ESP and TSC_AUX are 32 bits wide (see `wrmsr`).
    pub fn msr_held(&self, idx: u32, v: u64) -> u64 {
        match idx {
            msr::SYSENTER_ESP | msr::SYSENTER_EIP | msr::TSC_AUX if self.amd() => v & 0xffff_ffff,
            _ => v,
        }
    }

    /// WRMSR with the reserved-bit and canonical checks of SDM Vol. 4 and Vol. 3A §10.8.5.
    pub fn wrmsr(&mut self, idx: u32, v: u64) -> Flow {
        match idx {
            msr::TSC => self.tsc_offset = v.wrapping_sub(self.retired),
            msr::APIC_BASE => {
                // Bits 7:0, 9, 10 and those above MAXPHYADDR are reserved.
                if v & 0x6ff != 0 || v >> self.maxphyaddr != 0 {
                    return Err(gp(0));
                }
                self.sregs.apic_base = v;
            }
            msr::EFER => {
                let mut valid = ctrl::EFER_SCE | ctrl::EFER_LME | ctrl::EFER_LMA;
                if self.cpuid.has_ext_edx(ext_leaf1::EDX_NX) {
                    valid |= ctrl::EFER_NXE;
                }
                let old = self.sregs.efer;
                if v & !valid != 0 {
                    return Err(gp(0));
                }
                // LME cannot change while paging is on; LMA is read-only.
                if self.paging() && (v ^ old) & ctrl::EFER_LME != 0 {
                    return Err(gp(0));
                }
                self.sregs.efer = (v & !ctrl::EFER_LMA) | (old & ctrl::EFER_LMA);
                if (v ^ old) & ctrl::EFER_NXE != 0 {
                    self.tlb.flush();
                }
            }
            // AMD keeps 32 bits of these (its SYSENTER runs only outside long mode) and ignores
            // the rest, non-canonical or not; Intel keeps 64 and checks them like the bases
            // below (KVM, arch/x86/kvm/x86.c `__kvm_set_msr`: "IA32_SYSENTER_ESP and
            // IA32_SYSENTER_EIP cause #GP if non-canonical address is written on Intel but not
            // on AMD (which ignores the top 32-bits…)"; svm.c stores `(u32)data`).
            msr::SYSENTER_ESP | msr::SYSENTER_EIP if self.amd() => {
                self.msrs.insert(idx, self.msr_held(idx, v));
            }
            msr::FS_BASE
            | msr::GS_BASE
            | msr::KERNEL_GS_BASE
            | msr::LSTAR
            | msr::CSTAR
            | msr::SYSENTER_ESP
            | msr::SYSENTER_EIP => {
                if !canonical(v) {
                    return Err(gp(0));
                }
                match idx {
                    msr::FS_BASE => self.sregs.fs.base = v,
                    msr::GS_BASE => self.sregs.gs.base = v,
                    _ => {
                        self.msrs.insert(idx, v);
                    }
                }
            }
            msr::PAT => {
                // Each entry must be a valid memory type: 0, 1, 4, 5, 6 or 7.
                if v.to_le_bytes().iter().any(|&b| !matches!(b, 0 | 1 | 4..=7)) {
                    return Err(gp(0));
                }
                self.msrs.insert(idx, v);
            }
            // TSC_AUX bits 63:32 are reserved on Intel (#GP(0), SDM Vol. 4 Table 2-2); AMD
            // ignores them and reads them as 0 (KVM, arch/x86/kvm/x86.c `kvm_set_msr_common`:
            // "Current AMD CPUs completely ignore bits 63:32, i.e. they aren't reserved and
            // always read as zeros").
            msr::TSC_AUX if self.amd() => {
                self.msrs.insert(idx, self.msr_held(idx, v));
            }
            msr::SFMASK | msr::TSC_AUX => {
                if v >> 32 != 0 {
                    return Err(gp(0));
                }
                self.msrs.insert(idx, v);
            }
            msr::STAR | msr::SYSENTER_CS => {
                self.msrs.insert(idx, v);
            }
            _ => return Err(gp(0)),
        }
        Ok(())
    }
}
