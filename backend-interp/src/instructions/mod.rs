//! Instruction execution, dispatched in one place by iced-x86 `Mnemonic` into one module per
//! instruction group.

pub(crate) mod alu;
pub(crate) mod bcd;
pub(crate) mod bit;
pub(crate) mod bmi;
pub(crate) mod control;
pub(crate) mod descriptor;
pub(crate) mod ext;
pub(crate) mod flags;
pub(crate) mod gate;
pub(crate) mod io;
pub(crate) mod misc;
pub(crate) mod mov;
pub(crate) mod muldiv;
pub(crate) mod shift;
pub(crate) mod stack;
pub(crate) mod string;
pub(crate) mod syscall;
pub(crate) mod system;
pub(crate) mod task;
pub(crate) mod vme;

use iced_x86::{Instruction, Mnemonic};

use crate::cpu::{unsupported, Cpu, Flow};

/// The instruction groups, one module each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    Mov,
    Alu,
    Shift,
    MulDiv,
    Bit,
    Stack,
    Control,
    String,
    Io,
    System,
    Flags,
    Misc,
    Bcd,
    Syscall,
    Descriptor,
    Bmi,
    Ext,
}

/// The group that implements `m`, or `None` when the interpreter does not implement it.
fn group(m: Mnemonic) -> Option<Group> {
    use Mnemonic::*;
    Some(match m {
        Mov | Movzx | Movsx | Movsxd | Lea | Xchg | Cbw | Cwde | Cdqe | Cwd | Cdq | Cqo | Bswap | Cmpxchg
        | Xadd | Cmpxchg8b | Xlatb | Lds | Les | Lss | Lfs | Lgs | Cmova | Cmovae | Cmovb | Cmovbe
        | Cmove | Cmovg | Cmovge | Cmovl | Cmovle | Cmovne | Cmovno | Cmovnp | Cmovns | Cmovo | Cmovp
        | Cmovs | Seta | Setae | Setb | Setbe | Sete | Setg | Setge | Setl | Setle | Setne | Setno
        | Setnp | Setns | Seto | Setp | Sets => Group::Mov,
        Add | Adc | Sub | Sbb | Cmp | And | Or | Xor | Test | Inc | Dec | Neg | Not => Group::Alu,
        Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd => Group::Shift,
        Mul | Imul | Div | Idiv => Group::MulDiv,
        Bt | Bts | Btr | Btc | Bsf | Bsr => Group::Bit,
        Push | Pop | Pusha | Pushad | Popa | Popad | Pushf | Pushfd | Pushfq | Popf | Popfd | Popfq
        | Leave | Enter => Group::Stack,
        Jmp | Ja | Jae | Jb | Jbe | Je | Jg | Jge | Jl | Jle | Jne | Jno | Jnp | Jns | Jo | Jp | Js
        | Jcxz | Jecxz | Jrcxz | Loop | Loope | Loopne | Call | Ret | Retf | Int | Int3 | Into | Iret
        | Iretd | Iretq | Int1 => Group::Control,
        Movsb | Movsw | Movsd | Movsq | Stosb | Stosw | Stosd | Stosq | Lodsb | Lodsw | Lodsd | Lodsq
        | Cmpsb | Cmpsw | Cmpsd | Cmpsq | Scasb | Scasw | Scasd | Scasq | Insb | Insw | Insd | Outsb
        | Outsw | Outsd => Group::String,
        In | Out => Group::Io,
        Hlt | Cpuid | Rdmsr | Wrmsr | Rdtsc | Lgdt | Lidt | Sgdt | Sidt | Ltr | Lldt | Str | Sldt
        | Invlpg | Clts | Wbinvd | Invd | Swapgs | Smsw | Lmsw => Group::System,
        Clc | Stc | Cmc | Cld | Std | Cli | Sti | Lahf | Sahf => Group::Flags,
        Nop | Pause | Ud2 | Ud0 | Ud1 | Bound | Arpl | Reservednop | Endbr32 | Endbr64 | Lfence | Mfence
        | Sfence | Prefetchnta | Prefetcht0 | Prefetcht1 | Prefetcht2 | Prefetch | Prefetchw | Clflush
        | Wait => Group::Misc,
        Lar | Lsl | Verr | Verw => Group::Descriptor,
        Daa | Das | Aaa | Aas | Aam | Aad => Group::Bcd,
        Syscall | Sysret | Sysretq | Sysenter | Sysexit | Sysexitq => Group::Syscall,
        Popcnt | Lzcnt | Tzcnt | Andn | Bextr | Blsi | Blsmsk | Blsr | Bzhi | Mulx | Pdep | Pext | Rorx
        | Sarx | Shlx | Shrx | Adcx | Adox => Group::Bmi,
        Movbe | Cmpxchg16b | Rdtscp | Rdrand | Rdfsbase | Rdgsbase | Wrfsbase | Wrgsbase | Xgetbv
        | Xsetbv => Group::Ext,
        _ => return None,
    })
}

/// Whether the interpreter implements `m` (some forms of a mnemonic may still be `Unsupported`,
/// e.g. `MOVSD` the SSE instruction, task gates or call gates).
pub fn is_implemented(m: Mnemonic) -> bool {
    group(m).is_some()
}

/// Every mnemonic the interpreter implements, for `duet coverage`.
pub fn implemented_mnemonics() -> Vec<Mnemonic> {
    Mnemonic::values().filter(|&m| is_implemented(m)).collect()
}

/// Executes one decoded instruction: the single dispatch point.
pub(crate) fn execute(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    let m = ins.mnemonic();
    // VEX-encoded instructions are #UD in real-address and virtual-8086 mode (SDM Vol. 2A
    // §2.3.2; iced-x86 decodes C4/C5 as VEX there since 16-bit code has them).
    if ins.encoding() != iced_x86::EncodingKind::Legacy && (!cpu.protected() || cpu.v86()) {
        return Err(crate::cpu::ud());
    }
    match group(m) {
        Some(Group::Mov) => mov::exec(cpu, ins),
        Some(Group::Alu) => alu::exec(cpu, ins),
        Some(Group::Shift) => shift::exec(cpu, ins),
        Some(Group::MulDiv) => muldiv::exec(cpu, ins),
        Some(Group::Bit) => bit::exec(cpu, ins),
        Some(Group::Stack) => stack::exec(cpu, ins),
        Some(Group::Control) => control::exec(cpu, ins),
        Some(Group::String) => string::exec(cpu, ins),
        Some(Group::Io) => io::exec(cpu, ins),
        Some(Group::System) => system::exec(cpu, ins),
        Some(Group::Flags) => flags::exec(cpu, ins),
        Some(Group::Misc) => misc::exec(cpu, ins),
        Some(Group::Bcd) => bcd::exec(cpu, ins),
        Some(Group::Syscall) => syscall::exec(cpu, ins),
        Some(Group::Descriptor) => descriptor::exec(cpu, ins),
        Some(Group::Bmi) => bmi::exec(cpu, ins),
        Some(Group::Ext) => ext::exec(cpu, ins),
        None => Err(unsupported(format!("{m:?}"))),
    }
}

/// `Unsupported` for a form of an implemented mnemonic this group does not handle.
pub(crate) fn form(ins: &Instruction) -> crate::cpu::Abort {
    unsupported(format!("{:?} ({:?})", ins.mnemonic(), ins.code()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test CPU in real mode (16), flat 32-bit protected mode (32) or 64-bit mode (64, the first
    /// 2 MiB identity-mapped).
    fn cpu_in(bitness: u32) -> Cpu {
        use duet_core::state::ctrl;
        use duet_core::vm_memory::{Bytes, GuestAddress};
        use duet_core::Segment;
        let mut cpu = crate::cpu::test_cpu();
        let data = Segment::from_descriptor(0x10, 0x00cf_9300_0000_ffff);
        match bitness {
            16 => {
                cpu.sregs.cs = Segment::real_mode(0, true);
                return cpu;
            }
            32 => cpu.sregs.cs = Segment::from_descriptor(0x08, 0x00cf_9b00_0000_ffff),
            _ => {
                for (at, v) in [(0x1000u64, 0x2003u64), (0x2000, 0x3003), (0x3000, 0x83)] {
                    let _ = cpu.mem.write_slice(&v.to_le_bytes(), GuestAddress(at));
                }
                cpu.sregs.cr3 = 0x1000;
                cpu.sregs.cr4 |= ctrl::CR4_PAE;
                cpu.sregs.efer |= ctrl::EFER_LME | ctrl::EFER_LMA;
                cpu.sregs.cr0 |= ctrl::CR0_PG;
                cpu.sregs.cs = Segment::from_descriptor(0x08, 0x00af_9b00_0000_ffff);
            }
        }
        cpu.sregs.cr0 |= ctrl::CR0_PE;
        (cpu.sregs.ds, cpu.sregs.es, cpu.sregs.fs, cpu.sregs.gs, cpu.sregs.ss) =
            (data, data, data, data, data);
        cpu
    }

    /// STYLE §7: iced-x86 says which status flags and registers an instruction may write; the
    /// interpreter must change no other. Random instructions over random registers.
    fn check_against_iced(bitness: u32, mut seed: u64) {
        use duet_core::state::rflags::STATUS;
        use iced_x86::{Decoder, DecoderOptions, OpAccess};

        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = cpu_in(bitness);
        let mut cpu = cpu_in(bitness);
        let mut info_factory = iced_x86::InstructionInfoFactory::new();
        let runs = std::env::var("DUET_FLAG_CHECKS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
        let mut checked = 0;
        for _ in 0..runs {
            let bytes: Vec<u8> = (0..15).map(|_| next() as u8).collect();
            let ins = Decoder::with_ip(bitness, &bytes, 0, DecoderOptions::NONE).decode();
            if ins.is_invalid() || !is_implemented(ins.mnemonic()) {
                continue;
            }
            cpu.sregs = base.sregs;
            cpu.tlb.flush();
            for g in cpu.gpr.iter_mut() {
                let v = next();
                // Mostly small values, so memory operands often land in RAM.
                *g = if v & 3 == 0 { v } else { v & 0xffff };
            }
            cpu.rflags = (next() & STATUS) | duet_core::state::rflags::FIXED;
            cpu.gpr[4] = 0x8000;
            cpu.rip = 0x100;
            cpu.next_rip = 0x100 + ins.len() as u64;
            cpu.io = Default::default();
            let (before, gprs) = (cpu.rflags, cpu.gpr);
            if execute(&mut cpu, &ins).is_err() {
                continue;
            }
            let written = crate::flags::from_iced(ins.rflags_modified());
            let changed = (before ^ cpu.rflags) & STATUS;
            assert_eq!(changed & !written, 0, "{ins} changed {changed:#x}, iced allows {written:#x}");
            let mut allowed = 0u16;
            for u in info_factory.info(&ins).used_registers() {
                let full = u.register().full_register();
                let writes =
                    !matches!(u.access(), OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess);
                if full.is_gpr64() && writes {
                    allowed |= 1 << (full as u32 - iced_x86::Register::RAX as u32);
                }
            }
            // Event delivery (INT n, INT3, INTO, INT1) pushes a frame iced-x86 does not list.
            let delivers =
                matches!(ins.mnemonic(), Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Into | Mnemonic::Int1);
            for (i, (a, b)) in gprs.iter().zip(cpu.gpr.iter()).enumerate() {
                assert!(
                    delivers || a == b || allowed & (1 << i) != 0,
                    "{ins} wrote register {i} ({a:#x} → {b:#x})"
                );
            }
            checked += 1;
        }
        assert!(checked > runs / 20, "only {checked} of {runs} instructions retired");
    }

    #[test]
    fn flags_and_registers_change_only_where_iced_says_they_are_written() {
        check_against_iced(16, 0x2545_f491_4f6c_dd1d);
        check_against_iced(32, 0x9e37_79b9_7f4a_7c15);
        check_against_iced(64, 0xbf58_476d_1ce4_e5b9);
    }

    #[test]
    fn implemented_list_matches_dispatch() {
        let all = implemented_mnemonics();
        assert!(all.contains(&Mnemonic::Cmpxchg8b));
        assert!(all.contains(&Mnemonic::Iretq));
        assert!(!all.contains(&Mnemonic::Addps));
        assert!(all.iter().all(|&m| is_implemented(m)));
    }
}
