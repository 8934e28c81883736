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

use iced_x86::{Instruction, Mnemonic, OpKind};

use crate::cpu::{unsupported, Cpu, Flow};
use crate::decode::Decoded;

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
        | Wait | Salc => Group::Misc,
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

/// Executes one instruction (the step loop calls the handler it resolved at decode time).
pub(crate) type Handler = fn(&mut Cpu, &Decoded) -> Flow;

/// Register and immediate operands of the forms with a fast handler, resolved at decode time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Operands {
    /// Destination GPR (encoding number).
    pub r0: u8,
    /// Source GPR (encoding number), when the source is a register.
    pub r1: u8,
    /// Operand width in bytes (for near branches: the width of the target).
    pub bytes: u8,
    /// Immediate source, masked to its width as `read_op` reads it (near branches: the
    /// displacement from the instruction's start).
    pub imm: u64,
    /// Width in bytes of the memory operand.
    pub mbytes: u8,
    /// The memory operand.
    pub mem: crate::operand::MemRef,
}

/// The handler of `m`: the single dispatch point, consulted once per decoded instruction.
pub(crate) fn handler(m: Mnemonic) -> Handler {
    match group(m) {
        Some(Group::Mov) => |c, d| mov::exec(c, &d.ins),
        Some(Group::Alu) => |c, d| alu::exec(c, &d.ins),
        Some(Group::Shift) => |c, d| shift::exec(c, &d.ins),
        Some(Group::MulDiv) => |c, d| muldiv::exec(c, &d.ins),
        Some(Group::Bit) => |c, d| bit::exec(c, &d.ins),
        Some(Group::Stack) => |c, d| stack::exec(c, &d.ins),
        Some(Group::Control) => |c, d| control::exec(c, &d.ins),
        Some(Group::String) => |c, d| string::exec(c, &d.ins),
        Some(Group::Io) => |c, d| io::exec(c, &d.ins),
        Some(Group::System) => |c, d| system::exec(c, &d.ins),
        Some(Group::Flags) => |c, d| flags::exec(c, &d.ins),
        Some(Group::Misc) => |c, d| misc::exec(c, &d.ins),
        Some(Group::Bcd) => |c, d| bcd::exec(c, &d.ins),
        Some(Group::Syscall) => |c, d| syscall::exec(c, &d.ins),
        Some(Group::Descriptor) => |c, d| descriptor::exec(c, &d.ins),
        Some(Group::Bmi) => |c, d| bmi::exec(c, &d.ins),
        Some(Group::Ext) => |c, d| ext::exec(c, &d.ins),
        None => not_implemented,
    }
}

/// The handler of `ins` and its resolved operands: a fast handler for the register and
/// immediate forms of the common instructions (same semantics, same flag functions, no operand
/// decoding at run time), else the group's handler.
/// The third value says whether the handler is a fast one: those fail (only the near branches can)
/// before they change any state.
pub(crate) fn resolve(ins: &Instruction) -> (Handler, Operands, bool) {
    match fast_form(ins).or_else(|| memory_form(ins)) {
        Some((h, ops)) => (h, ops, true),
        None => (handler(ins.mnemonic()), Operands::default(), fails_clean(ins)),
    }
}

/// Forms the group handlers run that, like the fast ones, write no register, RIP or RFLAGS
/// before they can fail (every check and memory access comes first), so the step loop needs
/// no copy of the registers for them: near CALL and RET (`control::exec`: target checked,
/// return address pushed or read, then SP and RIP), PUSH of a GPR or an immediate and POP into
/// a GPR (`stack::exec`: the stack access, then SP, then the register).
fn fails_clean(ins: &Instruction) -> bool {
    use Mnemonic::*;
    if ins.encoding() != iced_x86::EncodingKind::Legacy {
        return false;
    }
    let gpr0 = ins.op_count() >= 1
        && ins.op_kind(0) == OpKind::Register
        && crate::cpu::gpr_slot(ins.op_register(0)).is_some();
    let imm0 = ins.op_count() == 1 && imm_op(ins, 0).is_some();
    match ins.mnemonic() {
        Push => ins.op_count() == 1 && (gpr0 || imm0),
        Pop => ins.op_count() == 1 && gpr0,
        Call => {
            ins.op_count() == 1
                && (matches!(
                    ins.op_kind(0),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) || gpr0)
        }
        Ret => true,
        _ => false,
    }
}

/// A GPR operand other than AH/CH/DH/BH: (encoding number, width).
fn gpr_op(ins: &Instruction, op: u32) -> Option<(u8, u8)> {
    if ins.op_kind(op) != OpKind::Register {
        return None;
    }
    let s = crate::cpu::gpr_slot(ins.op_register(op)).filter(|s| !s.high8)?;
    Some((s.index as u8, s.bytes))
}

/// An immediate operand as `read_op` reads it (extended by iced-x86, masked to its width).
fn imm_op(ins: &Instruction, op: u32) -> Option<u64> {
    let bytes = match ins.op_kind(op) {
        OpKind::Immediate8 => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        OpKind::Immediate64 | OpKind::Immediate8to64 | OpKind::Immediate32to64 => 8,
        _ => return None,
    };
    Some(ins.immediate(op) & crate::cpu::mask(bytes))
}

/// The GPR/memory forms of MOV, MOVZX and the binary ALU instructions with a fast handler.
fn memory_form(ins: &Instruction) -> Option<(Handler, Operands)> {
    use Mnemonic::*;
    if ins.encoding() != iced_x86::EncodingKind::Legacy || ins.op_count() != 2 {
        return None;
    }
    let m = ins.mnemonic();
    let mbytes = ins.memory_size().size() as u8;
    let (mem_op, other) = match (ins.op_kind(0), ins.op_kind(1)) {
        (OpKind::Memory, _) => (0, 1),
        (_, OpKind::Memory) => (1, 0),
        _ => return None,
    };
    let mem = crate::operand::MemRef::of(ins, mem_op)?;
    let reg = gpr_op(ins, other);
    let imm = imm_op(ins, other);
    let bytes = match reg {
        Some((_, b)) => b,
        None => mbytes,
    };
    // Same width on both sides, except MOVZX's wider register.
    if !matches!(mbytes, 1 | 2 | 4 | 8) || (m != Movzx && bytes != mbytes) || (reg.is_none() && imm.is_none())
    {
        return None;
    }
    let r = reg.map_or(0, |(r, _)| r);
    let ops = Operands { r0: r, r1: r, bytes, imm: imm.unwrap_or(0), mbytes, mem };
    let load = mem_op == 1;
    macro_rules! alu {
        ($op:expr) => {
            match (load, reg.is_some()) {
                (true, _) => alu::rm::<{ $op }> as Handler,
                (false, true) => alu::mem::<{ $op }, false>,
                (false, false) => alu::mem::<{ $op }, true>,
            }
        };
    }
    let h: Handler = match m {
        Mov | Movzx if load && reg.is_some() => mov::load,
        Mov if !load && reg.is_some() => mov::store::<false>,
        Mov if !load => mov::store::<true>,
        Add => alu!(alu::op::ADD),
        Adc => alu!(alu::op::ADC),
        Sub => alu!(alu::op::SUB),
        Sbb => alu!(alu::op::SBB),
        Cmp => alu!(alu::op::CMP),
        And => alu!(alu::op::AND),
        Or => alu!(alu::op::OR),
        Xor => alu!(alu::op::XOR),
        Test => alu!(alu::op::TEST),
        _ => return None,
    };
    // A register destination with a memory source needs the register; `op r, imm` is no memory form.
    if load && reg.is_none() {
        return None;
    }
    Some((h, ops))
}

fn fast_form(ins: &Instruction) -> Option<(Handler, Operands)> {
    use Mnemonic::*;
    if ins.encoding() != iced_x86::EncodingKind::Legacy {
        return None;
    }
    let m = ins.mnemonic();
    let n = ins.op_count();
    let (r0, bytes) = match m {
        Jmp | Ja | Jae | Jb | Jbe | Je | Jg | Jge | Jl | Jle | Jne | Jno | Jnp | Jns | Jo | Jp | Js
        | Call => {
            let bytes = match ins.op_kind(0) {
                OpKind::NearBranch16 => 2,
                OpKind::NearBranch32 => 4,
                OpKind::NearBranch64 => 8,
                _ => return None,
            };
            let ops = Operands { bytes, imm: ins.near_branch_target(), ..Operands::default() };
            let exec: Handler = if m == Call { control::call_near } else { control::jcc_near };
            return Some((exec, ops));
        }
        Ret => {
            // `stack::opsize`, with the code size the block was decoded for.
            let bytes = match ins.code().op_code().operand_size() {
                16 => 2,
                32 => 4,
                64 => 8,
                _ if ins.code_size() == iced_x86::CodeSize::Code16 => 2,
                _ => 4,
            };
            let imm = if ins.op_count() > 0 { ins.immediate(0) & 0xffff } else { 0 };
            return Some((control::ret_near, Operands { bytes, imm, ..Operands::default() }));
        }
        _ => gpr_op(ins, 0)?,
    };
    let src = if n == 2 { gpr_op(ins, 1) } else { None };
    let imm = if n == 2 { imm_op(ins, 1) } else { None };
    let mut ops = Operands { r0, bytes, ..Operands::default() };
    if let Some((r1, b1)) = src {
        if b1 != bytes && !matches!(m, Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr) {
            return None;
        }
        ops.r1 = r1;
    }
    ops.imm = imm.unwrap_or(0);
    let (rr, ri): (Handler, Handler) = match (m, n) {
        (Add, 2) => crate::wide::handlers::<{ alu::op::ADD }>(bytes),
        (Adc, 2) => crate::wide::handlers::<{ alu::op::ADC }>(bytes),
        (Sub, 2) => crate::wide::handlers::<{ alu::op::SUB }>(bytes),
        (Sbb, 2) => crate::wide::handlers::<{ alu::op::SBB }>(bytes),
        (Cmp, 2) => crate::wide::handlers::<{ alu::op::CMP }>(bytes),
        (And, 2) => crate::wide::handlers::<{ alu::op::AND }>(bytes),
        (Or, 2) => crate::wide::handlers::<{ alu::op::OR }>(bytes),
        (Xor, 2) => crate::wide::handlers::<{ alu::op::XOR }>(bytes),
        (Test, 2) => crate::wide::handlers::<{ alu::op::TEST }>(bytes),
        (Mov, 2) => (mov::rr, mov::ri),
        (Inc, 1) => return Some((alu::unary::<{ alu::op::INC }>, ops)),
        (Dec, 1) => return Some((alu::unary::<{ alu::op::DEC }>, ops)),
        (Neg, 1) => return Some((alu::unary::<{ alu::op::NEG }>, ops)),
        (Not, 1) => return Some((alu::unary::<{ alu::op::NOT }>, ops)),
        (Shl | Sal, 2) => (shift::rcl_count::<{ shift::op::SHL }>, shift::ri::<{ shift::op::SHL }>),
        (Shr, 2) => (shift::rcl_count::<{ shift::op::SHR }>, shift::ri::<{ shift::op::SHR }>),
        (Sar, 2) => (shift::rcl_count::<{ shift::op::SAR }>, shift::ri::<{ shift::op::SAR }>),
        (Rol, 2) => (shift::rcl_count::<{ shift::op::ROL }>, shift::ri::<{ shift::op::ROL }>),
        (Ror, 2) => (shift::rcl_count::<{ shift::op::ROR }>, shift::ri::<{ shift::op::ROR }>),
        (Rcl, 2) => (shift::rcl_count::<{ shift::op::RCL }>, shift::ri::<{ shift::op::RCL }>),
        (Rcr, 2) => (shift::rcl_count::<{ shift::op::RCR }>, shift::ri::<{ shift::op::RCR }>),
        _ => return None,
    };
    let shift = matches!(m, Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr);
    if shift {
        // The count is CL or an 8-bit immediate.
        return match (ins.op_kind(1), src) {
            (OpKind::Register, Some(_)) if ins.op_register(1) == iced_x86::Register::CL => Some((rr, ops)),
            (OpKind::Immediate8, _) => Some((ri, ops)),
            _ => None,
        };
    }
    match (src, imm) {
        (Some(_), _) => Some((rr, ops)),
        (None, Some(_)) => Some((ri, ops)),
        _ => None,
    }
}

/// The handler of a mnemonic the interpreter does not implement.
fn not_implemented(_: &mut Cpu, d: &Decoded) -> Flow {
    Err(unsupported(format!("{:?}", d.ins.mnemonic())))
}

/// Executes a decoded instruction with its resolved handler.
#[inline]
pub(crate) fn run(cpu: &mut Cpu, d: &Decoded) -> Flow {
    // VEX-encoded instructions are #UD in real-address and virtual-8086 mode (SDM Vol. 2A
    // §2.3.2; iced-x86 decodes C4/C5 as VEX there since 16-bit code has them).
    if d.vex && (!cpu.protected() || cpu.v86()) {
        return Err(crate::cpu::ud());
    }
    (d.exec)(cpu, d)
}

/// Executes one instruction decoded elsewhere (resolving its handler now).
#[cfg(test)]
pub(crate) fn execute(cpu: &mut Cpu, ins: &Instruction) -> Flow {
    run(cpu, &Decoded::new(*ins))
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
