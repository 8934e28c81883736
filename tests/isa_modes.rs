//! The same arithmetic programs assembled as 16-bit (real mode), 32-bit (protected mode) and
//! 64-bit (long mode) code must give the same 32-bit and 16-bit results and flags in every mode:
//! operand-size and address-size prefixes change meaning between modes, the results must not.
//! Each mode's run is also KVM against the software CPU, with a KVM-recorded snapshot.

mod common;

use common::*;
use duet::fixtures::Mode;
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// A hash loop over 32-bit registers: IMUL, XOR, ROL, ADD/ADC, SHLD, BSWAP, CMOV, SETcc.
fn hash32(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    a.mov(eax, 0x1234_5678)?;
    a.mov(ebx, 0x9abc_def0u32)?;
    a.mov(ecx, 200)?;
    a.xor(edx, edx)?;
    a.mov(esi, 0x0f0f_0f0f)?;
    a.xor(edi, edi)?;
    a.set_label(&mut top)?;
    a.imul_3(eax, eax, 0x0100_0193)?;
    a.xor(eax, ebx)?;
    a.rol(ebx, 5)?;
    a.add(ebx, eax)?;
    a.adc(edx, 0)?;
    a.shld(esi, eax, 3)?;
    a.bswap(esi)?;
    a.cmp(eax, ebx)?;
    a.cmovb(edi, esi)?;
    a.setg(dl)?;
    a.add(edi, edx)?;
    a.dec(ecx)?;
    a.jnz(top)?;
    Ok(())
}

/// 16-bit arithmetic with DIV/IDIV, MUL, sign and zero extension, and a 16-bit counter loop.
fn arith16(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut top = a.create_label();
    a.mov(eax, 0)?;
    a.mov(ebx, 0)?;
    a.mov(edx, 0)?;
    a.mov(esi, 0)?;
    a.mov(edi, 0)?;
    a.mov(ax, 0x7fff)?;
    a.mov(cx, 37)?;
    a.set_label(&mut top)?;
    a.add(ax, cx)?;
    a.mov(bx, 7)?;
    a.xor(dx, dx)?;
    a.push(ax)?;
    a.div(bx)?; // DX:AX / 7
    a.add(si, dx)?;
    a.pop(ax)?;
    a.mul(cx)?; // DX:AX = AX × CX
    a.xor(di, dx)?;
    a.movsx(edx, al)?;
    a.add(edi, edx)?;
    a.movzx(edx, ah)?;
    a.sub(esi, edx)?;
    a.cwd()?;
    a.idiv(bx)?;
    a.loop_(top)?;
    // IDIV leaves every status flag undefined (SDM Vol. 2A IDIV); end on defined ones (AF aside).
    a.or(ax, 0)?;
    Ok(())
}

/// Operand-size and address-size prefixed memory traffic: 32-bit stores, 16-bit loads, LEA.
fn memory(mode: Mode) -> impl Fn(&mut CodeAssembler) -> Result<(), IcedError> {
    let s = scratch(mode);
    move |a| {
        a.mov(dword_ptr(s), 0x8899_aabbu32)?;
        a.mov(dword_ptr(s + 4), 0x1122_3344)?;
        a.mov(eax, dword_ptr(s + 2))?;
        a.movzx(ebx, word_ptr(s + 1))?;
        a.movsx(ecx, byte_ptr(s + 3))?;
        a.mov(edx, 0x100)?;
        a.lea(esi, dword_ptr(edx + edx * 4 + 0x1000))?;
        a.lea(di, word_ptr(edx + edx * 8 - 1))?;
        a.and(edi, 0xffff)?;
        a.add(eax, ebx)?;
        a.sbb(ecx, esi)
    }
}

fn batch(mode: Mode) -> Batch {
    let mut b = Batch::new(&format!("modes-{mode}"), mode);
    b.case("hash32", 0, hash32);
    b.case("arith16", AF, arith16);
    b.case("memory", 0, memory(mode));
    b
}

#[test]
fn modes_same_program_same_results_in_16_32_and_64_bit_code() {
    let mut results = Vec::new();
    for mode in [Mode::Real, Mode::Protected, Mode::Long] {
        let runs = batch(mode).check();
        results.push((mode, runs.into_iter().next().map(|(_, s)| s).unwrap_or_default()));
    }
    let (first_mode, first) = &results[0];
    for (mode, slots) in &results[1..] {
        for (i, (x, y)) in first.iter().zip(slots).enumerate() {
            assert_eq!(x, y, "case {i}: {first_mode} mode and {mode} mode differ");
        }
    }
}
