//! Encodings Intel and AMD decode differently, under an Intel and an AMD CPUID profile whatever
//! the host is (docs/VENDORS.md): an AMD profile decodes with iced-x86's `DecoderOptions::AMD`.
//! Where this host's KVM runs the code on the silicon (64-bit ring 3 under kvm_pvm) it is
//! compared against the profile of the host's vendor; each KVM half skips out loud without KVM
//! or under `DUET_BACKENDS=interp`.

mod common;

use common::*;
use duet_core::cpuid::ext_leaf1;
use duet_core::{GuestMemory, RunOutcome, StopReason, Vendor};
use iced_x86::code_asm::*;

/// Where each branch test's code runs: above 64 KiB, so that a 16-bit RIP shows.
const HIGH_CODE: u64 = 0x2_0000;

/// 64-bit ring 3 jumping to `bytes` at [`HIGH_CODE`], with HLT (a #GP at CPL 3) at every
/// address in `stops`; RBX = 0x2_9000 (a 16-bit BX of 0x9000), ZF = 1, and the qword
/// 0x5555_5555_5555_9000 (a word of 0x9000) at `stack_slot`.
fn branch(bytes: &'static [u8], stops: &'static [u64], stack_slot: u64) -> Probe {
    Probe::new(64, long64_ring3, |a| {
        a.mov(rax, HIGH_CODE).unwrap();
        a.jmp(rax).unwrap();
    })
    .prep(move |mem, s| {
        poke(mem, HIGH_CODE, bytes);
        for &at in stops {
            poke(mem, at, &[0xf4]);
        }
        poke(mem, stack_slot, &0x5555_5555_5555_9000u64.to_le_bytes());
        s.regs.rbx = 0x2_9000;
        s.regs.rflags |= duet_core::state::rflags::ZF;
    })
}

/// Where a branch test stopped: the vector and RIP of the fault, and how far RSP moved.
fn landing(o: &RunOutcome, m: &GuestMemory) -> (Option<u64>, Option<u64>, i64) {
    let t = long_trap(o, m);
    (t.map(|t| t.vector), t.map(|t| t.rip), t.map_or(0, |t| t.rsp as i64 - STACK as i64))
}

#[test]
fn an_operand_size_prefix_makes_near_branches_16_bit_in_64_bit_mode_only_on_amd() {
    // SDM Vol. 2A CALL/JMP/Jcc, Vol. 2B RET: in 64-bit mode the operand size of near branches
    // is fixed at 64 bits, 66h is ignored (a rel32 follows 66 E8). AMD64 APM Vol. 3 (CALL near,
    // JMP near, Jcc, RET near): 66h gives a 16-bit operand size, so a rel16 follows, the target
    // is truncated to 16 bits and CALL/RET move 2 bytes (iced-x86 decodes so with
    // DecoderOptions::AMD). This host's silicon agrees (below; DEVELOPERS.md). Each stops in
    // the #GP of a HLT at CPL 3, or of the branch itself when its target is not canonical.
    type Case = (&'static str, &'static [u8], &'static [u64], (u64, i64), (u64, i64));
    let cases: [Case; 7] = [
        // AMD: rel16 0x4ffc from 0x2_0004, truncated: 0x5000. Intel: rel32 from 0x2_0006.
        (
            "o16 call rel",
            &[0x66, 0xe8, 0xfc, 0x4f, 0x00, 0x00],
            &[0x5000, 0x2_5002],
            (0x2_5002, -8),
            (0x5000, -2),
        ),
        // Target 0x2_0013, truncated: 0x13.
        ("o16 jmp rel8", &[0x66, 0xeb, 0x10], &[0x13, 0x2_0013], (0x2_0013, 0), (0x13, 0)),
        ("o16 je rel8", &[0x66, 0x74, 0x10], &[0x13, 0x2_0013], (0x2_0013, 0), (0x13, 0)),
        // loop with RCX = 0: RCX - 1 is not 0, taken.
        ("o16 loop", &[0x66, 0xe2, 0x10], &[0x13, 0x2_0013], (0x2_0013, 0), (0x13, 0)),
        // call bx / call rbx.
        ("o16 call rm", &[0x66, 0xff, 0xd3], &[0x9000, 0x2_9000], (0x2_9000, -8), (0x9000, -2)),
        // jmp [rsp - 16]: a word 0x9000, or a non-canonical qword (#GP at the JMP).
        ("o16 jmp m", &[0x66, 0xff, 0x64, 0x24, 0xf0], &[0x9000], (HIGH_CODE, 0), (0x9000, 0)),
        // ret: a word 0x9000 (RSP + 2), or a non-canonical qword (#GP at the RET).
        ("o16 ret", &[0x66, 0xc3], &[0x9000], (HIGH_CODE, 0), (0x9000, 2)),
    ];
    for (name, bytes, stops, (irip, isp), (arip, asp)) in cases {
        let slot = if name == "o16 jmp m" { STACK - 16 } else { STACK };
        let probe = branch(bytes, stops, slot);
        let (o, m) = probe.interp(Vendor::Intel);
        assert_eq!(landing(&o, &m), (Some(13), Some(irip), isp), "{name} on Intel");
        let (o, m) = probe.interp(Vendor::Amd);
        assert_eq!(landing(&o, &m), (Some(13), Some(arip), asp), "{name} on AMD");
        probe.check_on_kvm(name, |o, m| format!("{:x?}", landing(o, m)));
    }
}

#[test]
fn rex_w_far_pointers_are_m16_64_on_intel_and_m16_32_on_amd() {
    // SDM Vol. 2A JMP/CALL far and LSS: with REX.W the operand is m16:64 (offset at M, selector
    // at M + 8). AMD64 APM Vol. 3: the far pointer is m16:32 whatever REX.W says (offset at M,
    // selector at M + 4; iced-x86's DecoderOptions::AMD: "no o64 CALL/JMP FAR [mem], no o64
    // LSS/LFS/LGS"). M holds the qword 0x9000 and, at M + 8, the selector 0x30: Intel reaches
    // 0x30:0x9000, AMD reads the null selector 0 at M + 4 (#GP(0) for the far JMP; for LSS in
    // 64-bit ring 0, a null SS is allowed and loaded). This host's kvm_pvm emulates far
    // transfers and decodes them the Intel way whatever the vendor: it cannot decide.
    const M: u64 = 0x20_0000;
    let far = |bytes: &'static [u8], selector: u16| {
        Probe::new(64, long64, move |a| {
            a.mov(rax, M).unwrap();
            a.db(bytes).unwrap();
            a.hlt().unwrap();
        })
        .prep(move |mem, _| {
            poke(mem, M, &0x9000u64.to_le_bytes());
            poke(mem, M + 8, &selector.to_le_bytes());
            poke(mem, 0x9000, &[0xf4]);
        })
    };
    for (name, bytes) in [("jmp far", &[0x48, 0xff, 0x28][..]), ("call far", &[0x48, 0xff, 0x18][..])] {
        let (o, _) = far(bytes, sel::CODE64).interp(Vendor::Intel);
        assert_eq!(
            (o.stop, o.state.regs.rip, o.state.sregs.cs.selector),
            (StopReason::Halted, 0x9001, 0x30),
            "{name}"
        );
        let (o, m) = far(bytes, sel::CODE64).interp(Vendor::Amd);
        assert_eq!(
            long_trap(&o, &m).map(|t| (t.vector, t.error, t.rip)),
            Some((13, Some(0), CODE + 10)),
            "{name}"
        );
    }
    // lss rsp, [rax] with REX.W, the selector at M + 8 a data segment.
    let lss = far(&[0x48, 0x0f, 0xb2, 0x20], sel::DATA);
    let (o, _) = lss.interp(Vendor::Intel);
    assert_eq!(
        (o.state.regs.rsp, o.state.sregs.ss.selector, o.state.sregs.ss.unusable),
        (0x9000, sel::DATA, false)
    );
    let (o, _) = lss.interp(Vendor::Amd);
    assert_eq!((o.state.regs.rsp, o.state.sregs.ss.selector, o.state.sregs.ss.unusable), (0x9000, 0, true));
}

#[test]
fn lock_mov_cr0_is_mov_cr8_only_on_amd_parts_with_alt_mov_cr8() {
    // AMD64 APM Vol. 3 "MOV CRn": with CPUID Fn8000_0001 ECX[AltMovCr8] (bit 4), LOCK MOV CR0
    // accesses CR8 outside 64-bit mode; without it, and on Intel (SDM Vol. 2A §2.1.2: LOCK on
    // a non-memory instruction), the encoding is #UD. duet's profiles never advertise it.
    let probe = Probe::new(32, protected32, |a| {
        a.mov(eax, 7).unwrap();
        a.db(&[0xf0, 0x0f, 0x22, 0xc0]).unwrap(); // lock mov cr0, eax
        a.db(&[0xf0, 0x0f, 0x20, 0xc3]).unwrap(); // lock mov ebx, cr0
        a.hlt().unwrap();
    });
    for v in Vendor::MODELLED {
        let (o, m) = probe.interp(v);
        assert_eq!(prot_trap(&o, &m).map(|t| (t.vector, t.rip)), Some((6, CODE + 5)), "{v}");
    }
    let alt = with(&vendor_profile(Vendor::Amd), 0x8000_0001, 2, ext_leaf1::ECX_CR8_LEGACY);
    let (o, _) = probe.interp_with(&alt);
    assert_eq!((o.stop, o.state.sregs.cr8, o.state.regs.rbx), (StopReason::Halted, 7, 7));
}

#[test]
fn ud0_takes_a_modrm_byte_on_intel_and_none_on_amd() {
    // SDM Vol. 2B UD: UD0 is 0F FF /r; AMD64 APM Vol. 3 UD0: 0F FF without a ModRM byte
    // (iced-x86's DecoderOptions::AMD). At the end of a mapped 2 MiB page, with nothing mapped
    // after it, Intel's fetch of the ModRM byte faults first (#PF at 0x20_0000); AMD has the
    // whole instruction and raises #UD.
    let probe = Probe::new(64, long64, |a| {
        a.mov(rax, 0x1f_fffeu64).unwrap();
        a.jmp(rax).unwrap();
    })
    .prep(|mem, _| {
        poke(mem, 0x1f_fffe, &[0x0f, 0xff]);
        poke(mem, PT + 0x2000 + 8, &0u64.to_le_bytes());
    });
    let (o, m) = probe.interp(Vendor::Intel);
    assert_eq!(long_trap(&o, &m).map(|t| (t.vector, t.rip)), Some((14, 0x1f_fffe)));
    assert_eq!(o.state.sregs.cr2, 0x20_0000);
    let (o, m) = probe.interp(Vendor::Amd);
    assert_eq!(long_trap(&o, &m).map(|t| (t.vector, t.rip)), Some((6, 0x1f_fffe)));
}
