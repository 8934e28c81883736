//! The fast register forms of the binary ALU instructions specialised by operand width at
//! decode time: the same flag functions and steps as `instructions::alu::{rr, ri}`, with the
//! width a constant so that its masks and sign bits fold away.

use crate::cpu::{Cpu, Flow};
use crate::decode::Decoded;
use crate::instructions::alu::{self, compute, writes};
use crate::instructions::Handler;

/// `op r, src` on `B`-byte operands, as `alu::binary` does it.
#[inline(always)]
fn binary<const OP: u8, const B: u32>(cpu: &mut Cpu, d: &Decoded, src: u64) -> Flow {
    let r = usize::from(d.ops.r0);
    let a = cpu.gpr_sized(r, B);
    let (res, f) = compute::<OP>(cpu, a, src, B);
    if writes(OP) {
        cpu.set_gpr_sized(r, B, res);
    }
    cpu.set_status(f);
    Ok(())
}

/// `op r, r` on `B`-byte registers (neither AH–BH).
fn rr<const OP: u8, const B: u32>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    let src = cpu.gpr_sized(usize::from(d.ops.r1), B);
    binary::<OP, B>(cpu, d, src)
}

/// `op r, imm` on a `B`-byte register.
fn ri<const OP: u8, const B: u32>(cpu: &mut Cpu, d: &Decoded) -> Flow {
    binary::<OP, B>(cpu, d, d.ops.imm)
}

/// The register/register and register/immediate handlers of `OP` for `bytes`-wide operands.
pub(crate) fn handlers<const OP: u8>(bytes: u8) -> (Handler, Handler) {
    match bytes {
        1 => (rr::<OP, 1>, ri::<OP, 1>),
        2 => (rr::<OP, 2>, ri::<OP, 2>),
        4 => (rr::<OP, 4>, ri::<OP, 4>),
        8 => (rr::<OP, 8>, ri::<OP, 8>),
        // No GPR has another width; the width-generic handlers would take it.
        _ => (alu::rr::<OP>, alu::ri::<OP>),
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions};

    use super::*;
    use crate::cpu::test_cpu;

    /// Every specialised handler leaves exactly the registers and RFLAGS the width-generic one
    /// leaves, over random operands and incoming flags.
    #[test]
    fn specialised_handlers_match_the_generic_ones() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // op r/m, r (ModRM C8: reg = rcx, rm = rax) and op r/m, imm8 (80/83 /n, rm = rax) in
        // 64-bit code at each width: 8-bit (with REX), 16-bit (66), 32-bit, 64-bit (REX.W).
        let mut forms: Vec<(u8, u8, Option<u8>)> = [0x00u8, 0x10, 0x28, 0x18, 0x38, 0x20, 0x08, 0x30, 0x84]
            .iter()
            .map(|&o| (o, 0xc8, None))
            .collect();
        forms.extend((0..8u8).map(|n| (0x80, 0xc0 | (n << 3), Some(0x85))));
        for (opcode, modrm, imm) in forms {
            for (prefix, wide) in
                [(&[0x40u8][..], false), (&[0x66][..], true), (&[][..], true), (&[0x48][..], true)]
            {
                let op = if wide && opcode == 0x80 {
                    0x83
                } else if wide {
                    opcode | 1
                } else {
                    opcode
                };
                let mut bytes = prefix.to_vec();
                bytes.extend([op, modrm]);
                bytes.extend(imm);
                let ins = Decoder::with_ip(64, &bytes, 0, DecoderOptions::NONE).decode();
                let d = Decoded::new(ins);
                assert!(d.fast, "{ins} has no fast handler");
                for _ in 0..200 {
                    let mut a = test_cpu();
                    a.gpr = std::array::from_fn(|_| next());
                    a.rflags = (next() & duet_core::state::rflags::STATUS) | duet_core::state::rflags::FIXED;
                    let mut b = test_cpu();
                    (b.gpr, b.rflags) = (a.gpr, a.rflags);
                    let generic = alu::exec(&mut a, &ins);
                    let fast = (d.exec)(&mut b, &d);
                    assert_eq!(generic, fast, "{ins}");
                    assert_eq!((a.gpr, a.rflags), (b.gpr, b.rflags), "{ins}");
                }
            }
        }
    }
}
