//! MOVBE, CMPXCHG16B, RDTSCP, RDRAND, RDFSBASE/WRFSBASE/RDGSBASE/WRGSBASE, XGETBV/XSETBV and
//! the LOCK prefix rules, with the exceptions each page of SDM Vol. 2 lists.

mod common;

use std::time::Duration;

use common::*;
use duet_core::cpuid::{ext_leaf1, leaf1_ecx, leaf7_ebx};
use duet_core::state::msr;
use duet_core::state::rflags::{CF, STATUS, ZF};
use duet_core::{CpuidProfile, GuestMemory, RunOutcome, StopReason};
use iced_x86::code_asm::*;

/// Where the guests store their results.
const OUT: u64 = 0x9000;

/// Runs 64-bit code `f` on `profile` until HLT.
fn run64(
    profile: &CpuidProfile,
    f: impl FnOnce(&mut CodeAssembler),
) -> (RunOutcome, std::sync::Arc<GuestMemory>) {
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

/// Runs raw 64-bit `bytes` followed by HLT on the baseline profile.
fn run_bytes64(bytes: &[u8]) -> RunOutcome {
    let mut code = bytes.to_vec();
    code.push(0xf4);
    let mem = memory(&code);
    let s = long64(&mem);
    run(mem, &s).0
}

#[test]
fn movbe_loads_and_stores_byte_reversed() {
    let (out, mem) = run64(&CpuidProfile::baseline(), |a| {
        a.mov(rax, 0x0102_0304_0506_0708u64).unwrap();
        a.movbe(qword_ptr(OUT), rax).unwrap();
        a.mov(dword_ptr(OUT + 8), 0xaabb_ccdd_u32 as i32).unwrap();
        a.movbe(ebx, dword_ptr(OUT + 8)).unwrap();
        a.mov(rcx, u64::MAX).unwrap();
        a.movbe(cx, word_ptr(OUT + 8)).unwrap();
    });
    assert_eq!(peek64(&mem, OUT), 0x0807_0605_0403_0201);
    assert_eq!(out.state.regs.rbx, 0xddcc_bbaa);
    // A 16-bit destination merges (SDM Vol. 2B MOVBE: "16-bit operand size").
    assert_eq!(out.state.regs.rcx, 0xffff_ffff_ffff_ddcc);
    // Without MOVBE in CPUID: #UD.
    let p = without(&CpuidProfile::baseline(), 1, 2, leaf1_ecx::MOVBE);
    let (out, _) = run64(&p, |a| a.movbe(eax, dword_ptr(OUT)).unwrap());
    assert_eq!(stub_vector(&out.state), Some(6));
}

#[test]
fn cmpxchg16b_swaps_or_loads_and_faults_when_misaligned() {
    let (out, mem) = run64(&CpuidProfile::baseline(), |a| {
        a.mov(qword_ptr(OUT), 1).unwrap();
        a.mov(qword_ptr(OUT + 8), 2).unwrap();
        a.mov(eax, 1).unwrap();
        a.mov(edx, 2).unwrap();
        a.mov(ebx, 0x33).unwrap();
        a.mov(ecx, 0x44).unwrap();
        a.cmpxchg16b(xmmword_ptr(OUT)).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 0x20)).unwrap();
        // Second time the comparison fails: RDX:RAX ← the memory value, ZF = 0.
        a.cmpxchg16b(xmmword_ptr(OUT)).unwrap();
        a.pushfq().unwrap();
        a.pop(qword_ptr(OUT + 0x28)).unwrap();
    });
    // SDM Vol. 2A CMPXCHG16B: equal → m128 ← RCX:RBX, ZF = 1; else RDX:RAX ← m128, ZF = 0.
    assert_eq!((peek64(&mem, OUT), peek64(&mem, OUT + 8)), (0x33, 0x44));
    assert_eq!(peek64(&mem, OUT + 0x20) & ZF, ZF);
    assert_eq!(peek64(&mem, OUT + 0x28) & ZF, 0);
    assert_eq!((out.state.regs.rax, out.state.regs.rdx), (0x33, 0x44));
    // "#GP(0) if the memory operand for CMPXCHG16B is not aligned on a 16-byte boundary".
    let (out, _) = run64(&CpuidProfile::baseline(), |a| a.cmpxchg16b(xmmword_ptr(OUT + 8)).unwrap());
    assert_eq!(stub_vector(&out.state), Some(13));
    let p = without(&CpuidProfile::baseline(), 1, 2, leaf1_ecx::CX16);
    let (out, _) = run64(&p, |a| a.cmpxchg16b(xmmword_ptr(OUT)).unwrap());
    assert_eq!(stub_vector(&out.state), Some(6));
}

#[test]
fn rdtscp_returns_the_tsc_and_tsc_aux() {
    let (out, mem) = run64(&CpuidProfile::baseline(), |a| {
        a.mov(ecx, msr::TSC_AUX).unwrap();
        a.mov(eax, 0x5a).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.rdtsc().unwrap();
        a.mov(dword_ptr(OUT), eax).unwrap();
        a.rdtscp().unwrap();
        a.mov(dword_ptr(OUT + 4), eax).unwrap();
    });
    // ECX ← IA32_TSC_AUX[31:0]; the TSC moved forward (the interpreter's counts instructions).
    assert_eq!(out.state.regs.rcx, 0x5a);
    assert!(peek32(&mem, OUT + 4) > peek32(&mem, OUT));
    let p = without(&CpuidProfile::baseline(), 0x8000_0001, 3, ext_leaf1::EDX_RDTSCP);
    let (out, _) = run64(&p, |a| a.rdtscp().unwrap());
    assert_eq!(stub_vector(&out.state), Some(6));
}

#[test]
fn rdrand_is_not_advertised_and_sets_cf_where_it_is() {
    // The baseline leaves RDRAND out (its values cannot match hardware): #UD.
    assert_eq!(CpuidProfile::baseline().lookup(1, 0)[2] & leaf1_ecx::RDRAND, 0);
    let (out, _) = run64(&CpuidProfile::baseline(), |a| a.rdrand(eax).unwrap());
    assert_eq!(stub_vector(&out.state), Some(6));
    let p = with(&CpuidProfile::baseline(), 1, 2, leaf1_ecx::RDRAND);
    let (out, _) = run64(&p, |a| {
        a.stc().unwrap();
        a.cmc().unwrap();
        a.rdrand(rax).unwrap();
        a.rdrand(bx).unwrap();
        a.pushfq().unwrap();
        a.pop(rcx).unwrap();
    });
    // SDM Vol. 2B RDRAND: CF = 1 for a valid value, OF/SF/ZF/AF/PF cleared.
    assert_eq!(out.state.regs.rcx & STATUS, CF);
    assert_ne!(out.state.regs.rax, 0);
    assert_eq!(out.state.regs.rbx >> 16, 0);
}

#[test]
fn fsgsbase_needs_cr4_fsgsbase_and_a_canonical_base() {
    // CR4.FSGSBASE = 0: #UD (SDM Vol. 2B RDFSBASE).
    let (out, _) = run64(&CpuidProfile::baseline(), |a| a.rdfsbase(rax).unwrap());
    assert_eq!(stub_vector(&out.state), Some(6));
    let (out, mem) = run64(&CpuidProfile::baseline(), |a| {
        a.mov(rax, cr4).unwrap();
        a.bts(rax, 16).unwrap();
        a.mov(cr4, rax).unwrap();
        a.mov(rbx, OUT).unwrap();
        a.wrfsbase(rbx).unwrap();
        a.mov(dword_ptr(OUT + 0x10), 0x77).unwrap();
        a.mov(ecx, dword_ptr(0x10).fs()).unwrap();
        a.mov(edx, 0xffff_f000u32).unwrap();
        a.wrgsbase(edx).unwrap(); // a 32-bit source is zero-extended
        a.rdgsbase(rsi).unwrap();
        a.rdfsbase(edi).unwrap();
        a.mov(rax, 0x8000_0000_0000u64).unwrap();
        a.wrfsbase(rax).unwrap(); // non-canonical: #GP(0)
    });
    assert_eq!(out.state.regs.rcx, 0x77);
    assert_eq!(out.state.regs.rsi, 0xffff_f000);
    assert_eq!(out.state.regs.rdi, OUT);
    assert_eq!(stub_vector(&out.state), Some(13));
    assert_eq!(peek64(&mem, out.state.regs.rsp + 8), 0, "error code");
    // Without FSGSBASE in CPUID, CR4.FSGSBASE is reserved: MOV CR4 is #GP(0).
    let p = without(&CpuidProfile::baseline(), 7, 1, leaf7_ebx::FSGSBASE);
    let (out, _) = run64(&p, |a| {
        a.mov(rax, cr4).unwrap();
        a.bts(rax, 16).unwrap();
        a.mov(cr4, rax).unwrap();
    });
    assert_eq!(stub_vector(&out.state), Some(13));
}

#[test]
fn xgetbv_is_ud_and_cr4_osxsave_reserved_without_xsave() {
    // XSAVE is not advertised: XGETBV is #UD (SDM Vol. 2C XGETBV: CR4.OSXSAVE = 0 → #UD) and
    // CR4.OSXSAVE cannot be set (SDM Vol. 3A §2.5: reserved where CPUID lacks XSAVE).
    let (out, _) = run64(&CpuidProfile::baseline(), |a| {
        a.xor(ecx, ecx).unwrap();
        a.xgetbv().unwrap();
    });
    assert_eq!(stub_vector(&out.state), Some(6));
    let (out, _) = run64(&CpuidProfile::baseline(), |a| {
        a.mov(rax, cr4).unwrap();
        a.bts(rax, 18).unwrap();
        a.mov(cr4, rax).unwrap();
    });
    assert_eq!(stub_vector(&out.state), Some(13));
    // With XSAVE: XCR0 reads 1 after reset; XSETBV of a bit it cannot hold is #GP(0).
    let p = with(&CpuidProfile::baseline(), 1, 2, leaf1_ecx::XSAVE);
    let (out, _) = run64(&p, |a| {
        a.mov(rax, cr4).unwrap();
        a.bts(rax, 18).unwrap();
        a.mov(cr4, rax).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.xgetbv().unwrap();
        a.mov(ebx, eax).unwrap();
        a.mov(eax, 3).unwrap();
        a.xor(edx, edx).unwrap();
        a.xsetbv().unwrap();
    });
    assert_eq!(out.state.regs.rbx, 1);
    assert_eq!(stub_vector(&out.state), Some(13));
}

#[test]
fn lock_is_ud_on_a_register_destination_or_a_non_lockable_instruction() {
    // SDM Vol. 2A LOCK: #UD unless the instruction is one of the lockable ones with a memory
    // destination.
    for bytes in [
        &[0xf0, 0x01, 0xd8][..],   // lock add eax, ebx
        &[0xf0, 0x90],             // lock nop
        &[0xf0, 0x8b, 0x03],       // lock mov eax, [rbx]
        &[0xf0, 0x0f, 0xa3, 0x03], // lock bt [rbx], eax (BT does not write)
    ] {
        let out = run_bytes64(bytes);
        assert_eq!(stub_vector(&out.state), Some(6), "{bytes:02x?}");
    }
    // lock add [rbx], eax (F0 01 03) with RBX = 0 (in RAM): retires.
    let out = run_bytes64(&[0xf0, 0x01, 0x03]);
    assert_eq!(out.state.regs.rip, CODE + 4);
}
