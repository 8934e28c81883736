//! Fast system calls: SYSCALL/SYSRET (SDM Vol. 2B; 64-bit mode) and SYSENTER/SYSEXIT.

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

/// Whether SYSENTER/SYSEXIT are invalid here: a CPU whose profile says AuthenticAMD does not
/// recognise them in long mode, 64-bit and compatibility mode alike (AMD64 APM Vol. 3, SYSENTER
/// and SYSEXIT: "#UD … in long mode"); Intel parts run them there (SDM Vol. 2B SYSENTER).
fn amd_long_mode(cpu: &Cpu) -> bool {
    cpu.long_mode() && cpu.cpuid.vendor() == "AuthenticAMD"
}

/// Executes SYSCALL, SYSRET, SYSENTER or SYSEXIT.
pub(crate) fn exec(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let msr_of = |cpu: &Cpu, i: u32| cpu.msrs.get(&i).copied().unwrap_or(0);
    match ins.mnemonic() {
        Mnemonic::Syscall => {
            if !cpu.mode64() || cpu.sregs.efer & ctrl::EFER_SCE == 0 {
                return Err(ud());
            }
            let star = msr_of(cpu, msr::STAR);
            let sel = ((star >> 32) & 0xfffc) as u16;
            cpu.gpr[1] = cpu.next_rip;
            cpu.gpr[11] = cpu.rflags;
            let fmask = msr_of(cpu, msr::SFMASK);
            cpu.set_rflags(cpu.rflags & !fmask & !duet_core::state::rflags::RF);
            cpu.sregs.cs = flat(sel, true, 0, true);
            cpu.sregs.ss = flat(sel.wrapping_add(8), false, 0, false);
            cpu.next_rip = msr_of(cpu, msr::LSTAR);
        }
        Mnemonic::Sysret | Mnemonic::Sysretq => {
            if !cpu.mode64() || cpu.sregs.efer & ctrl::EFER_SCE == 0 {
                return Err(ud());
            }
            if cpu.cpl() != 0 {
                return Err(gp(0));
            }
            let to64 = ins.code() == Code::Sysretq;
            let base = ((msr_of(cpu, msr::STAR) >> 48) & 0xffff) as u16;
            let rip = if to64 { cpu.gpr[1] } else { cpu.gpr[1] & 0xffff_ffff };
            if to64 && !canonical(rip) {
                return Err(gp(0));
            }
            cpu.set_rflags((cpu.gpr[11] & 0x3c_7fd7) | 2);
            let cs = if to64 { base.wrapping_add(16) } else { base } | 3;
            cpu.sregs.cs = flat(cs, true, 3, to64);
            cpu.sregs.ss = flat(base.wrapping_add(8) | 3, false, 3, false);
            cpu.next_rip = rip;
        }
        Mnemonic::Sysenter => {
            if amd_long_mode(cpu) {
                return Err(ud());
            }
            let cs = msr_of(cpu, msr::SYSENTER_CS) as u16;
            if !cpu.protected() || cs & 0xfffc == 0 {
                return Err(gp(0));
            }
            let lm = cpu.long_mode();
            use duet_core::state::rflags::{IF, RF, VM};
            cpu.rflags &= !(VM | IF | RF);
            let (sp, ip) = (msr_of(cpu, msr::SYSENTER_ESP), msr_of(cpu, msr::SYSENTER_EIP));
            let sel = cs & 0xfffc;
            cpu.sregs.cs = flat(sel, true, 0, lm);
            cpu.sregs.ss = flat(sel.wrapping_add(8), false, 0, false);
            if lm {
                cpu.gpr[4] = sp;
                cpu.next_rip = ip;
            } else {
                cpu.gpr[4] = sp & 0xffff_ffff;
                cpu.next_rip = ip & 0xffff_ffff;
            }
        }
        Mnemonic::Sysexit | Mnemonic::Sysexitq => {
            if amd_long_mode(cpu) {
                return Err(ud());
            }
            let cs = msr_of(cpu, msr::SYSENTER_CS) as u16;
            if !cpu.protected() || cs & 0xfffc == 0 || cpu.cpl() != 0 {
                return Err(gp(0));
            }
            let to64 = ins.code() == Code::Sysexitq;
            let (sp, ip) = if to64 {
                (cpu.gpr[1], cpu.gpr[2])
            } else {
                (cpu.gpr[1] & 0xffff_ffff, cpu.gpr[2] & 0xffff_ffff)
            };
            if to64 && (!canonical(sp) || !canonical(ip)) {
                return Err(gp(0));
            }
            let sel = cs.wrapping_add(if to64 { 32 } else { 16 }) | 3;
            cpu.sregs.cs = flat(sel, true, 3, to64);
            cpu.sregs.ss = flat(sel.wrapping_add(8), false, 3, false);
            cpu.gpr[4] = sp;
            cpu.next_rip = ip;
        }
        _ => return Err(form(ins)),
    }
    Ok(())
}
