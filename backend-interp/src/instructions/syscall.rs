//! Fast system calls: SYSCALL/SYSRET and SYSENTER/SYSEXIT, each as the profile's vendor defines
//! it (SDM Vol. 2B SYSCALL, SYSRET, SYSENTER, SYSEXIT; AMD64 APM Vol. 3, same pages). Intel
//! runs SYSCALL/SYSRET only in 64-bit mode and SYSENTER/SYSEXIT in every protected mode; AMD
//! runs SYSCALL/SYSRET in every mode EFER.SCE enables and SYSENTER/SYSEXIT only outside long
//! mode (docs/VENDORS.md).

use duet_core::state::rflags::{IF, RF, VM};
use duet_core::state::{ctrl, msr};
use duet_core::Segment;
use iced_x86::{Code, Instruction, Mnemonic};

use super::form;
use crate::cpu::{canonical, gp, ud, Cpu, Flow};

/// The flat 4 GiB segment SYSCALL/SYSENTER and their returns load (fixed hidden parts).
fn flat(selector: u16, code: bool, dpl: u8, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl,
        db: !(code && long),
        s: true,
        l: code && long,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// RFLAGS bits SYSRET loads from R11 (SDM Vol. 2B SYSRET: `(R11 & 3C7FD7H) | 2`; AMD64 APM
/// Vol. 3 SYSRET: "RFLAGS.q = R11 // RF=0,VM=0" — the same bits).
const SYSRET_FLAGS: u64 = 0x3c_7fd7;

impl Cpu {
    /// A storage MSR's value (0 until written).
    fn msr_value(&self, i: u32) -> u64 {
        self.msrs.get(&i).copied().unwrap_or(0)
    }

    /// SYSCALL. Intel: #UD outside 64-bit mode (SDM Vol. 2B SYSCALL). AMD (APM Vol. 3 SYSCALL,
    /// "SYSCALL_LONG_MODE" / "SYSCALL_LEGACY_MODE"; its exception table lists no mode for #UD
    /// but EFER.SCE = 0): in long mode RIP from LSTAR (64-bit mode) or CSTAR (compatibility
    /// mode) into 64-bit code, RCX/R11 saved and RFLAGS masked with SFMASK; in legacy mode
    /// (real, virtual-8086 and protected mode alike) ECX gets the return EIP, EIP comes from
    /// STAR[31:0], CS/SS are flat 32-bit ring-0 segments and VM, IF and RF are cleared.
    fn syscall(&mut self) -> Flow {
        let sce = self.sregs.efer & ctrl::EFER_SCE != 0;
        if !sce || (!self.amd() && !self.mode64()) {
            return Err(ud());
        }
        let star = self.msr_value(msr::STAR);
        let cs = ((star >> 32) & 0xfffc) as u16;
        // SS is STAR[47:32] + 8 with STAR's RPL bits (SDM: "SS.Selector ← IA32_STAR[47:32] +
        // 8"; APM: "SS.sel = MSR_STAR.SYSCALL_CS + 8"); only CS has its RPL cleared.
        let ss = ((star >> 32) as u16).wrapping_add(8);
        if self.long_mode() {
            let target = if self.mode64() { self.msr_value(msr::LSTAR) } else { self.msr_value(msr::CSTAR) };
            self.gpr[1] = self.next_rip;
            // R11 gets RFLAGS with RF = 0 on both: AMD says "with rf cleared", and Intel clears RF
            // "at the start of the instruction" (SDM Vol. 3B §18.3.1.1) before SYSCALL saves it;
            // the step loop clears RF only after an instruction, so an IRET's RF = 1 is still
            // here.
            self.gpr[11] = self.rflags & !RF;
            let fmask = self.msr_value(msr::SFMASK);
            self.set_rflags(self.rflags & !fmask & !RF);
            self.sregs.cs = flat(cs, true, 0, true);
            self.sregs.ss = flat(ss, false, 0, false);
            self.next_rip = target;
        } else {
            self.set_gpr_sized(1, 4, self.next_rip);
            self.rflags &= !(VM | IF | RF);
            self.sregs.cs = flat(cs, true, 0, false);
            self.sregs.ss = flat(ss, false, 0, false);
            self.next_rip = star & 0xffff_ffff;
        }
        Ok(())
    }

    /// SYSRET (`to64`: SYSRETQ). Intel (SDM Vol. 2B SYSRET): #UD outside 64-bit mode; #GP(0)
    /// at CPL 0 for a non-canonical RCX; CS and SS get fixed ring-3 flat parts. AMD (APM Vol. 3
    /// SYSRET): #GP(0) outside protected mode or at CPL > 0; no canonical check (the fetch at
    /// the new RIP faults, at CPL 3); only SS's selector and CPL change — "SS base, limit,
    /// attributes unchanged" (Linux: X86_BUG_SYSRET_SS_ATTRS) — and outside 64-bit mode it
    /// returns to 32-bit code with EIP = ECX and sets IF instead of loading RFLAGS from R11.
    fn sysret(&mut self, to64: bool) -> Flow {
        let sce = self.sregs.efer & ctrl::EFER_SCE != 0;
        let amd = self.amd();
        if !sce || (!amd && !self.mode64()) {
            return Err(ud());
        }
        if !self.protected() || self.cpl() != 0 {
            return Err(gp(0));
        }
        let base = ((self.msr_value(msr::STAR) >> 48) & 0xffff) as u16;
        let to64 = to64 && self.mode64();
        let rip = if to64 { self.gpr[1] } else { self.gpr[1] & 0xffff_ffff };
        if to64 && !amd && !canonical(rip) {
            return Err(gp(0));
        }
        if self.mode64() {
            self.set_rflags((self.gpr[11] & SYSRET_FLAGS) | 2);
        } else {
            self.rflags |= IF;
        }
        let cs = if to64 { base.wrapping_add(16) } else { base } | 3;
        let ss = base.wrapping_add(8) | 3;
        self.sregs.cs = flat(cs, true, 3, to64);
        self.sregs.ss = if amd {
            // The hidden part stays; DPL reads as the new CPL, as KVM reports it on SVM.
            Segment { selector: ss, dpl: 3, ..self.sregs.ss }
        } else {
            flat(ss, false, 3, false)
        };
        self.next_rip = rip;
        Ok(())
    }

    /// SYSENTER. Both vendors: #GP(0) in real mode or with IA32_SYSENTER_CS[15:2] = 0. Intel
    /// runs it in long mode too, entering 64-bit code with all 64 bits of the SYSENTER MSRs
    /// (SDM Vol. 2B SYSENTER); AMD raises #UD in long mode, 64-bit and compatibility mode alike
    /// (APM Vol. 3 SYSENTER: "This instruction is valid only in legacy mode").
    fn sysenter(&mut self) -> Flow {
        if self.amd() && self.long_mode() {
            return Err(ud());
        }
        let cs = self.msr_value(msr::SYSENTER_CS) as u16;
        if !self.protected() || cs & 0xfffc == 0 {
            return Err(gp(0));
        }
        let lm = self.long_mode();
        self.rflags &= !(VM | IF | RF);
        let (sp, ip) = (self.msr_value(msr::SYSENTER_ESP), self.msr_value(msr::SYSENTER_EIP));
        let sel = cs & 0xfffc;
        self.sregs.cs = flat(sel, true, 0, lm);
        self.sregs.ss = flat(sel.wrapping_add(8), false, 0, false);
        if lm {
            self.gpr[4] = sp;
            self.next_rip = ip;
        } else {
            self.gpr[4] = sp & 0xffff_ffff;
            self.next_rip = ip & 0xffff_ffff;
        }
        Ok(())
    }

    /// SYSEXIT (`to64`: SYSEXITQ): as SYSENTER, #UD in long mode on AMD (APM Vol. 3 SYSEXIT).
    fn sysexit(&mut self, to64: bool) -> Flow {
        if self.amd() && self.long_mode() {
            return Err(ud());
        }
        let cs = self.msr_value(msr::SYSENTER_CS) as u16;
        if !self.protected() || cs & 0xfffc == 0 || self.cpl() != 0 {
            return Err(gp(0));
        }
        let (sp, ip) = if to64 {
            (self.gpr[1], self.gpr[2])
        } else {
            (self.gpr[1] & 0xffff_ffff, self.gpr[2] & 0xffff_ffff)
        };
        if to64 && (!canonical(sp) || !canonical(ip)) {
            return Err(gp(0));
        }
        let sel = cs.wrapping_add(if to64 { 32 } else { 16 }) | 3;
        self.sregs.cs = flat(sel, true, 3, to64);
        self.sregs.ss = flat(sel.wrapping_add(8), false, 3, false);
        self.gpr[4] = sp;
        self.next_rip = ip;
        Ok(())
    }
}

/// Executes SYSCALL, SYSRET, SYSENTER or SYSEXIT.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    match ins.mnemonic() {
        Mnemonic::Syscall => cpu.syscall(),
        Mnemonic::Sysret | Mnemonic::Sysretq => cpu.sysret(ins.code() == Code::Sysretq),
        Mnemonic::Sysenter => cpu.sysenter(),
        Mnemonic::Sysexit | Mnemonic::Sysexitq => cpu.sysexit(ins.code() == Code::Sysexitq),
        _ => Err(form(ins)),
    }
}
