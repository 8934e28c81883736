//! POPCNT, LZCNT, TZCNT, BMI1, BMI2 and ADX: results against independent arithmetic in the
//! test, flags from each instruction's "Flags Affected" (SDM Vol. 2), and the CPUID gating
//! ("CPUID.… = 0 → #UD"; LZCNT/TZCNT fall back to BSR/BSF).

mod common;

use std::time::Duration;

use common::*;
use duet_core::cpuid::{ext_leaf1, leaf1_ecx, leaf7_ebx};
use duet_core::state::rflags::{CF, OF, SF, ZF};
use duet_core::{CpuidProfile, StopReason};
use iced_x86::code_asm::*;

/// Where the guests store their results.
const OUT: u64 = 0x9000;

/// Runs 64-bit `f` on `profile`; returns the outcome and guest memory.
fn run64(
    profile: &CpuidProfile,
    f: impl FnOnce(&mut CodeAssembler),
) -> (duet_core::RunOutcome, std::sync::Arc<duet_core::GuestMemory>) {
    let code = asm(64, |a| {
        f(a);
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = long64(&mem);
    let (out, _) = run_profile(mem.clone(), &s, profile, Duration::from_secs(5), |_| {});
    assert_eq!(out.stop, StopReason::Halted);
    (out, mem)
}

/// The `i`th result slot.
fn slot(mem: &duet_core::GuestMemory, i: u64) -> u64 {
    peek64(mem, OUT + 8 * i)
}

#[test]
fn popcnt_lzcnt_tzcnt_count_bits_and_set_cf_zf() {
    let x: u64 = 0x00f0_0000_0001_8000;
    let (out, mem) = run64(&CpuidProfile::baseline(), |a| {
        a.mov(rbx, x).unwrap();
        a.popcnt(rax, rbx).unwrap();
        a.mov(qword_ptr(OUT), rax).unwrap();
        a.lzcnt(rax, rbx).unwrap();
        a.mov(qword_ptr(OUT + 8), rax).unwrap();
        a.tzcnt(rax, rbx).unwrap();
        a.mov(qword_ptr(OUT + 16), rax).unwrap();
        a.lzcnt(eax, ebx).unwrap();
        a.mov(qword_ptr(OUT + 24), rax).unwrap();
        a.tzcnt(ax, bx).unwrap(); // BX = 0x8000
        a.mov(qword_ptr(OUT + 32), rax).unwrap();
        // Zero source: LZCNT/TZCNT return the operand size with CF = 1 (SDM Vol. 2A LZCNT).
        a.xor(ecx, ecx).unwrap();
        a.tzcnt(edx, ecx).unwrap();
        a.mov(qword_ptr(OUT + 40), rdx).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 48)).unwrap();
        a.popcnt(edx, ecx).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 56)).unwrap();
    });
    assert_eq!(slot(&mem, 0), u64::from(x.count_ones()));
    assert_eq!(slot(&mem, 1), u64::from(x.leading_zeros()));
    assert_eq!(slot(&mem, 2), u64::from(x.trailing_zeros()));
    assert_eq!(slot(&mem, 3), u64::from((x as u32).leading_zeros()));
    // A 16-bit destination merges into RAX: bits 63:16 keep LZCNT EAX's zero-extended result.
    assert_eq!(slot(&mem, 4), 15);
    assert_eq!(slot(&mem, 5), 32);
    assert_eq!(slot(&mem, 6) & (CF | ZF), CF);
    // POPCNT of 0: ZF = 1, every other status flag cleared (SDM Vol. 2B POPCNT).
    assert_eq!(slot(&mem, 7) & duet_core::state::rflags::STATUS, ZF);
    assert_eq!(out.state.regs.rdx, 0);
}

#[test]
fn bmi1_andn_bextr_blsi_blsmsk_blsr() {
    let (x, y): (u64, u64) = (0x1234_5678_9abc_def0, 0xff00_ff00_f0f0_0ff0);
    let ctl: u64 = (12 << 8) | 20; // LEN = 12, START = 20
    let (_, mem) = run64(&CpuidProfile::baseline(), |a| {
        a.mov(rbx, x).unwrap();
        a.mov(rcx, y).unwrap();
        a.mov(rdx, ctl).unwrap();
        a.andn(rax, rbx, rcx).unwrap();
        a.mov(qword_ptr(OUT), rax).unwrap();
        a.bextr(rax, rbx, rdx).unwrap();
        a.mov(qword_ptr(OUT + 8), rax).unwrap();
        a.blsi(rax, rbx).unwrap();
        a.mov(qword_ptr(OUT + 16), rax).unwrap();
        a.blsmsk(rax, rbx).unwrap();
        a.mov(qword_ptr(OUT + 24), rax).unwrap();
        a.blsr(rax, rbx).unwrap();
        a.mov(qword_ptr(OUT + 32), rax).unwrap();
        // BEXTR with START beyond the operand gives 0 and ZF = 1; BLSR of 0: CF = 1.
        a.mov(edx, 0x0840).unwrap();
        a.bextr(eax, ebx, edx).unwrap();
        a.mov(qword_ptr(OUT + 40), rax).unwrap();
        a.xor(esi, esi).unwrap();
        a.blsr(esi, esi).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 48)).unwrap();
        // BLSI of 0: CF = 0, ZF = 1.
        a.blsi(esi, esi).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 56)).unwrap();
    });
    assert_eq!(slot(&mem, 0), !x & y);
    assert_eq!(slot(&mem, 1), (x >> 20) & 0xfff);
    assert_eq!(slot(&mem, 2), x & x.wrapping_neg());
    assert_eq!(slot(&mem, 3), x ^ (x - 1));
    assert_eq!(slot(&mem, 4), x & (x - 1));
    assert_eq!(slot(&mem, 5), 0);
    assert_eq!(slot(&mem, 6) & (CF | ZF | OF), CF | ZF);
    assert_eq!(slot(&mem, 7) & (CF | ZF), ZF);
}

#[test]
fn bmi2_bzhi_mulx_pdep_pext_rorx_and_shifts() {
    let (x, y): (u64, u64) = (0xf234_5678_9abc_def1, 0x0000_ffff_0000_00ff);
    let (_, mem) = run64(&CpuidProfile::baseline(), |a| {
        a.mov(rbx, x).unwrap();
        a.mov(rcx, y).unwrap();
        a.mov(edx, 40).unwrap();
        a.bzhi(rax, rbx, rdx).unwrap();
        a.mov(qword_ptr(OUT), rax).unwrap();
        a.pdep(rax, rbx, rcx).unwrap();
        a.mov(qword_ptr(OUT + 8), rax).unwrap();
        a.pext(rax, rbx, rcx).unwrap();
        a.mov(qword_ptr(OUT + 16), rax).unwrap();
        a.rorx(rax, rbx, 12).unwrap();
        a.mov(qword_ptr(OUT + 24), rax).unwrap();
        a.mov(ecx, 68).unwrap(); // masked to 4
        a.sarx(rax, rbx, rcx).unwrap();
        a.mov(qword_ptr(OUT + 32), rax).unwrap();
        a.shlx(rax, rbx, rcx).unwrap();
        a.mov(qword_ptr(OUT + 40), rax).unwrap();
        a.shrx(eax, ebx, ecx).unwrap();
        a.mov(qword_ptr(OUT + 48), rax).unwrap();
        // MULX: RDX × RBX → high in RSI, low in RDI; flags untouched.
        a.mov(rdx, 0xdead_beef_1234_5678u64).unwrap();
        a.stc().unwrap();
        a.mulx(rsi, rdi, rbx).unwrap();
        a.mov(qword_ptr(OUT + 56), rsi).unwrap();
        a.mov(qword_ptr(OUT + 64), rdi).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 72)).unwrap();
        // Both destinations one register: the high half (SDM Vol. 2B MULX).
        a.mulx(rsi, rsi, rbx).unwrap();
        a.mov(qword_ptr(OUT + 80), rsi).unwrap();
        // BZHI with index ≥ operand size: unchanged, CF = 1.
        a.mov(edx, 32).unwrap();
        a.bzhi(eax, ebx, edx).unwrap();
        a.mov(qword_ptr(OUT + 88), rax).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 96)).unwrap();
    });
    // PDEP/PEXT by hand: the mask's set bits are 0..8 and 32..48.
    let low8 = x & 0xff;
    let next16 = (x >> 8) & 0xffff;
    assert_eq!(slot(&mem, 0), x & ((1 << 40) - 1));
    assert_eq!(slot(&mem, 1), low8 | (next16 << 32));
    assert_eq!(slot(&mem, 2), (x & 0xff) | (((x >> 32) & 0xffff) << 8));
    assert_eq!(slot(&mem, 3), x.rotate_right(12));
    assert_eq!(slot(&mem, 4), ((x as i64) >> 4) as u64);
    assert_eq!(slot(&mem, 5), x << 4);
    assert_eq!(slot(&mem, 6), u64::from((x as u32) >> 4));
    let prod = u128::from(0xdead_beef_1234_5678u64) * u128::from(x);
    assert_eq!(slot(&mem, 7), (prod >> 64) as u64);
    assert_eq!(slot(&mem, 8), prod as u64);
    assert_eq!(slot(&mem, 9) & CF, CF);
    assert_eq!(slot(&mem, 10), (prod >> 64) as u64);
    assert_eq!(slot(&mem, 11), x & 0xffff_ffff);
    assert_eq!(slot(&mem, 12) & (CF | SF | ZF), CF | SF);
}

#[test]
fn adcx_and_adox_carry_through_cf_and_of_independently() {
    // Two interleaved 128-bit additions, one on CF and one on OF, as the SDM's ADX use intends.
    let (a0, a1, b0, b1) = (u64::MAX, 5u64, 1u64, 7u64);
    let (_, mem) = run64(&CpuidProfile::baseline(), |a| {
        a.xor(eax, eax).unwrap(); // CF = OF = 0
        a.mov(r8, a0).unwrap();
        a.mov(r9, a1).unwrap();
        a.mov(r10, a0).unwrap();
        a.mov(r11, a1).unwrap();
        a.mov(rbx, b0).unwrap();
        a.mov(rcx, b1).unwrap();
        a.adcx(r8, rbx).unwrap();
        a.adox(r10, rbx).unwrap();
        a.adcx(r9, rcx).unwrap();
        a.adox(r11, rcx).unwrap();
        for (i, r) in [r8, r9, r10, r11].into_iter().enumerate() {
            a.mov(qword_ptr(OUT + 8 * i as u64), r).unwrap();
        }
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 32)).unwrap();
    });
    let sum = (u128::from(a1) << 64 | u128::from(a0)) + (u128::from(b1) << 64 | u128::from(b0));
    assert_eq!((slot(&mem, 0), slot(&mem, 1)), (sum as u64, (sum >> 64) as u64));
    assert_eq!((slot(&mem, 2), slot(&mem, 3)), (sum as u64, (sum >> 64) as u64));
    // XOR set ZF and PF; ADCX/ADOX change only CF/OF (both 0 after the high words).
    assert_eq!(slot(&mem, 4) & (CF | OF | ZF), ZF);
}

#[test]
fn absent_features_raise_ud_and_lzcnt_tzcnt_execute_as_bsr_bsf() {
    let base = CpuidProfile::baseline();
    type Emit = fn(&mut CodeAssembler);
    let cases: [(CpuidProfile, Emit); 5] = [
        (without(&base, 1, 2, leaf1_ecx::POPCNT), |a| a.popcnt(eax, ebx).unwrap()),
        (without(&base, 7, 1, leaf7_ebx::BMI1), |a| a.andn(eax, ebx, ecx).unwrap()),
        (without(&base, 7, 1, leaf7_ebx::BMI2), |a| a.pdep(eax, ebx, ecx).unwrap()),
        (without(&base, 7, 1, leaf7_ebx::BMI2), |a| a.mulx(eax, ebx, ecx).unwrap()),
        (without(&base, 7, 1, leaf7_ebx::ADX), |a| a.adox(eax, ebx).unwrap()),
    ];
    for (profile, f) in cases {
        let (out, _) = run64(&profile, f);
        assert_eq!(stub_vector(&out.state), Some(6));
    }
    // SDM Vol. 2A LZCNT: without LZCNT the encoding executes as BSR (index of the top set bit);
    // Vol. 2B TZCNT likewise as BSF.
    let legacy = without(&without(&base, 0x8000_0001, 2, ext_leaf1::ECX_ABM), 7, 1, leaf7_ebx::BMI1);
    let (out, _) = run64(&legacy, |a| {
        a.mov(ebx, 0x10).unwrap();
        a.lzcnt(eax, ebx).unwrap();
        a.tzcnt(ecx, ebx).unwrap();
    });
    assert_eq!((out.state.regs.rax, out.state.regs.rcx), (4, 4));
    let (out, _) = run64(&base, |a| {
        a.mov(ebx, 0x10).unwrap();
        a.lzcnt(eax, ebx).unwrap();
    });
    assert_eq!(out.state.regs.rax, 27);
}

#[test]
fn vex_encoded_instructions_are_ud_in_real_mode() {
    // ANDN EAX, EBX, ECX (VEX C4 E2 60 F2 C1): SDM Vol. 2A §2.3.2, VEX in real mode is #UD.
    let code = [0xc4, 0xe2, 0x60, 0xf2, 0xc1, 0xf4];
    let mem = memory(&code);
    let s = real_mode(&mem);
    let (out, _) = run(mem, &s);
    // Real-mode stub: push imm16 (3 bytes) + hlt.
    assert_eq!(out.state.regs.rip, STUBS + 6 * 8 + 4);
}
