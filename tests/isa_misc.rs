//! Miscellaneous instructions: the NOP family (multi-byte NOP, hint NOPs, PAUSE, ENDBR64),
//! fences, prefetches and CLFLUSH change no architectural state; MOV to/from DR0–DR3, DR6,
//! DR7; UD0/UD1/UD2 raise #UD in every mode.

mod common;

use common::*;
use duet::fixtures::{GuestBuilder, Mode};
use duet::{compare, testing, StopReason};
use iced_x86::code_asm::*;

#[test]
fn misc_nops_fences_prefetch_clflush_change_nothing_match_kvm() {
    let mut b = Batch::new("misc-nops", Mode::Long);
    let s = scratch(Mode::Long);
    b.case("nop forms, pause, endbr64, fences, prefetch, clflush", 0, move |a| {
        a.mov(rax, 0x1111u64)?;
        a.mov(rbx, 0x2222u64)?;
        a.mov(rcx, 0x3333u64)?;
        set_flags(a, 64, CF | ZF | SF)?;
        a.nop()?;
        a.db(&[0x66, 0x90])?; // xchg ax, ax = NOP
        a.nop_1(dword_ptr(rax + rax))?; // 0F 1F /0
        a.nop_1(word_ptr(rax + 0x10))?;
        a.db(&[0x0f, 0x18, 0x20])?; // reserved-NOP / hint space (0F 18 /4)
        a.pause()?;
        a.endbr64()?;
        a.lfence()?;
        a.mfence()?;
        a.sfence()?;
        a.prefetcht0(byte_ptr(s))?;
        a.prefetchnta(byte_ptr(s))?;
        a.clflush(byte_ptr(s))?;
        Ok(())
    });
    b.case("mov dr0-dr3, dr7 (disabled), dr6", 0, |a| {
        a.mov(rax, 0x1000u64)?;
        a.mov(dr0, rax)?;
        a.mov(rax, 0x2000u64)?;
        a.mov(dr1, rax)?;
        a.mov(rax, 0x3000u64)?;
        a.mov(dr2, rax)?;
        a.mov(rax, 0x4000u64)?;
        a.mov(dr3, rax)?;
        a.mov(rax, 0x0700u64)?; // GE LE and a reserved-1 bit; no breakpoint enabled
        a.mov(dr7, rax)?;
        a.mov(rbx, dr0)?;
        a.mov(rcx, dr1)?;
        a.mov(rdx, dr2)?;
        a.mov(rsi, dr3)?;
        a.mov(rdi, dr7)?;
        a.mov(rax, dr6)
    });
    b.check();
}

#[test]
fn misc_undefined_opcodes_raise_ud_in_every_mode() {
    // SDM Vol. 2B UD: UD0 (0F FF /r), UD1 (0F B9 /r), UD2 (0F 0B) raise #UD.
    for mode in [Mode::Real, Mode::Protected, Mode::Long] {
        for bytes in [vec![0x0f, 0x0b], vec![0x0f, 0xb9, 0xc0], vec![0x0f, 0xff, 0xc0]] {
            let guest = GuestBuilder::new(mode).name("ud").image(bytes.clone()).build().unwrap();
            let mut reports = Vec::new();
            for kind in testing::select_backends() {
                let r = run(kind, &guest);
                match &r.outcome.stop {
                    StopReason::Exception(e) => {
                        assert_eq!(
                            (e.vector, e.rip),
                            (6, guest.state.regs.rip),
                            "{mode} {bytes:02x?} on {kind}"
                        )
                    }
                    StopReason::CannotRun(why) if kind == duet::BackendKind::Kvm => {
                        eprintln!("skipped: kvm: {mode} {bytes:02x?}: this host's KVM cannot run it ({why}); the SDM decides");
                        continue;
                    }
                    other => panic!("{mode} {bytes:02x?} on {kind}: {other}"),
                }
                reports.push(r);
            }
            if let [kvm, interp] = &reports[..] {
                let diff = compare(kvm, interp);
                assert!(diff.is_empty(), "{mode} {bytes:02x?}: KVM and the software CPU differ:\n{diff}");
            }
        }
    }
}
