//! String instructions: MOVS STOS LODS CMPS SCAS in every element size, without prefix, with
//! REP / REPE / REPNE, with DF clear and set, with 64- and 32-bit addressing (the 0x67 prefix:
//! ESI/EDI/ECX, garbage above them) and counts 0, 1 and 7; INS/OUTS; and 16-bit offset
//! wrap-around in real mode. After each case a checksum of both buffers lands in RDX.

mod common;

use common::*;
use duet::fixtures::Mode;
use iced_x86::code_asm::*;
use iced_x86::{IcedError, Instruction, Register, RepPrefixKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
}

fn make(op: Op, size: u32, asz: u32, rep: RepPrefixKind) -> Result<Instruction, IcedError> {
    let seg = Register::None;
    match (op, size) {
        (Op::Movs, 8) => Instruction::with_movsb(asz, seg, rep),
        (Op::Movs, 16) => Instruction::with_movsw(asz, seg, rep),
        (Op::Movs, 32) => Instruction::with_movsd(asz, seg, rep),
        (Op::Movs, _) => Instruction::with_movsq(asz, seg, rep),
        (Op::Stos, 8) => Instruction::with_stosb(asz, rep),
        (Op::Stos, 16) => Instruction::with_stosw(asz, rep),
        (Op::Stos, 32) => Instruction::with_stosd(asz, rep),
        (Op::Stos, _) => Instruction::with_stosq(asz, rep),
        (Op::Lods, 8) => Instruction::with_lodsb(asz, seg, rep),
        (Op::Lods, 16) => Instruction::with_lodsw(asz, seg, rep),
        (Op::Lods, 32) => Instruction::with_lodsd(asz, seg, rep),
        (Op::Lods, _) => Instruction::with_lodsq(asz, seg, rep),
        (Op::Cmps, 8) => Instruction::with_cmpsb(asz, seg, rep),
        (Op::Cmps, 16) => Instruction::with_cmpsw(asz, seg, rep),
        (Op::Cmps, 32) => Instruction::with_cmpsd(asz, seg, rep),
        (Op::Cmps, _) => Instruction::with_cmpsq(asz, seg, rep),
        (Op::Scas, 8) => Instruction::with_scasb(asz, rep),
        (Op::Scas, 16) => Instruction::with_scasw(asz, rep),
        (Op::Scas, 32) => Instruction::with_scasd(asz, rep),
        (Op::Scas, _) => Instruction::with_scasq(asz, rep),
    }
}

/// Source buffer: bytes 0x10, 0x11, …; destination: the same for its first 24 bytes, then
/// different, so REPE/REPNE comparisons stop part-way.
fn buffers() -> (Vec<u8>, Vec<u8>) {
    let src: Vec<u8> = (0..64u8).map(|i| 0x10 + i).collect();
    let dst: Vec<u8> = (0..64u8).map(|i| if i < 24 { 0x10 + i } else { 0xc0 ^ i }).collect();
    (src, dst)
}

/// Restores both buffers at `s` (source) and `s + 0x100` (destination).
fn restore(a: &mut CodeAssembler, s: u64) -> Result<(), IcedError> {
    let (src, dst) = buffers();
    for (base, bytes) in [(s, src), (s + 0x100, dst)] {
        for (i, q) in bytes.chunks(8).enumerate() {
            a.mov(rdx, u64::from_le_bytes(q.try_into().unwrap_or_default()))?;
            a.mov(qword_ptr(base + 8 * i as u64), rdx)?;
        }
    }
    a.xor(edx, edx)
}

/// RDX := a checksum of both buffers; RFLAGS and the other registers are kept.
fn checksum(a: &mut CodeAssembler, s: u64) -> Result<(), IcedError> {
    a.pushfq()?;
    a.mov(r8, rsi)?;
    a.xor(edx, edx)?;
    for off in (0..64).step_by(8).chain((0x100..0x140).step_by(8)) {
        a.rol(rdx, 7)?;
        a.mov(rsi, qword_ptr(s + off))?;
        a.xor(rdx, rsi)?;
    }
    a.mov(rsi, r8)?;
    a.popfq()
}

#[test]
fn string_every_op_size_prefix_direction_and_address_size_match_kvm() {
    let mut b = Batch::new("string-ops", Mode::Long);
    let s = scratch(Mode::Long);
    for op in [Op::Movs, Op::Stos, Op::Lods, Op::Cmps, Op::Scas] {
        let reps: &[RepPrefixKind] = if matches!(op, Op::Cmps | Op::Scas) {
            &[RepPrefixKind::None, RepPrefixKind::Repe, RepPrefixKind::Repne]
        } else {
            &[RepPrefixKind::None, RepPrefixKind::Repe]
        };
        for size in [8u32, 16, 32, 64] {
            for &rep in reps {
                let counts: &[u64] = if rep == RepPrefixKind::None { &[3] } else { &[0, 1, 7] };
                for &count in counts {
                    for df in [false, true] {
                        for asz in [64u32, 32] {
                            let ins = make(op, size, asz, rep).unwrap();
                            let label = format!(
                                "{op:?}{} {} count={count} df={} a{asz}",
                                sz(size),
                                match rep {
                                    RepPrefixKind::None => "",
                                    RepPrefixKind::Repe if matches!(op, Op::Cmps | Op::Scas) => "repe",
                                    RepPrefixKind::Repe => "rep",
                                    _ => "repne",
                                },
                                u8::from(df)
                            )
                            .to_lowercase();
                            b.case(label, 0, move |a| {
                                restore(a, s)?;
                                // DF = 1 starts near the end so the elements stay in the buffers.
                                let start = if df { 40 } else { 8 };
                                let hi = if asz == 32 { 0xffff_ffff_0000_0000u64 } else { 0 };
                                a.mov(rsi, hi | (s + start))?;
                                a.mov(rdi, hi | (s + 0x100 + start))?;
                                a.mov(rcx, hi | count)?;
                                // SCAS looks for the element at destination offset start+16 (equal part).
                                a.mov(
                                    rax,
                                    u64::from_le_bytes([0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27]),
                                )?;
                                set_flags(a, 64, if df { DF } else { 0 })?;
                                a.add_instruction(ins)?;
                                checksum(a, s)
                            });
                        }
                    }
                }
            }
        }
    }
    b.check();
}

#[test]
fn string_ins_outs_and_real_mode_wraparound_match_kvm() {
    // INS from a port with no device reads all ones; OUTS to the debug console prints.
    let mut b = Batch::new("string-io", Mode::Long);
    let s = scratch(Mode::Long);
    for (label, ins) in [
        ("rep insb", Instruction::with_insb(64, RepPrefixKind::Repe).unwrap()),
        ("rep insw", Instruction::with_insw(64, RepPrefixKind::Repe).unwrap()),
        ("rep insd", Instruction::with_insd(64, RepPrefixKind::Repe).unwrap()),
        ("rep outsb", Instruction::with_outsb(64, Register::None, RepPrefixKind::Repe).unwrap()),
    ] {
        let port = if label.contains("outs") { 0xe9u32 } else { 0x1234 };
        b.case(label, 0, move |a| {
            restore(a, s)?;
            a.mov(rsi, s + 4)?;
            a.mov(rdi, s + 0x100 + 4)?;
            a.mov(ecx, 5)?;
            a.mov(edx, port)?;
            a.add_instruction(ins)?;
            checksum(a, s)
        });
    }
    b.check();

    // Real mode: 16-bit SI/DI wrap within the segment (SDM Vol. 3A §21.1.1: offsets are 16 bits).
    let mut r = Batch::new("string-real", Mode::Real);
    for (label, src_off, dst_off, count, df) in [
        ("rep movsb si wraps up", 0xfffeu32, 0x6000u32, 4u32, false),
        ("rep movsb di wraps down", 0x6000, 0x0001, 3, true),
        ("rep stosw di wraps", 0x6000, 0xfffe, 2, false),
    ] {
        let ins = if label.contains("stosw") {
            Instruction::with_stosw(16, RepPrefixKind::Repe).unwrap()
        } else {
            Instruction::with_movsb(16, Register::None, RepPrefixKind::Repe).unwrap()
        };
        r.case(label, 0, move |a| {
            // ES = 0x3000 so the writes land away from code and data; DS = 0x1000 (the batch's).
            a.mov(ax, 0x3000)?;
            a.mov(es, ax)?;
            a.mov(dword_ptr(0xfffc).es(), 0)?;
            a.mov(dword_ptr(0).es(), 0)?;
            a.mov(dword_ptr(0x6000).es(), 0)?;
            a.mov(esi, 0xabcd_0000 | src_off)?;
            a.mov(edi, 0x1234_0000 | dst_off)?;
            a.mov(ecx, 0x5678_0000 | count)?;
            a.mov(eax, 0x4142_4344)?;
            set_flags(a, 16, if df { DF } else { 0 })?;
            a.add_instruction(ins)?;
            a.mov(ebx, dword_ptr(0xfffc).es())?;
            a.mov(edx, dword_ptr(0).es())?;
            Ok(())
        });
    }
    r.check();
}
