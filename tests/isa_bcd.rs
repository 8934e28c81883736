//! BCD adjustments: DAA DAS AAA AAS AAM AAD over every AL with every AF/CF, in protected mode.
//!
//! This host's KVM cannot run DAA, AAA and AAS (KVM_EXIT_INTERNAL_ERROR, DEVELOPERS.md), so their
//! expected results come from the Operation sections of SDM Vol. 2A "DAA", "AAA", "AAS", worked
//! out below; KVM still runs them where it can, and where it ends in `CannotRun` the KVM half is
//! skipped out loud. The QEMU reference (duet-qemu) runs every batch too, as the third opinion,
//! and is held to the same SDM model. DAS is also compared with KVM directly.
//! In 64-bit mode all six raise #UD.

mod common;

use common::*;
use duet::fixtures::{GuestBuilder, Mode};
use duet::{compare, testing, BackendKind, StopReason};
use iced_x86::code_asm::eax;
use iced_x86::{Code, Instruction};

/// Initial AH of case `al`: varied, including 0xFF so carries and borrows wrap.
fn ah_for(al: u32) -> u32 {
    (al.wrapping_mul(7) ^ 0x5c) & 0xff
}

fn szp(v: u8) -> u64 {
    let mut f = 0;
    if v == 0 {
        f |= ZF;
    }
    if v & 0x80 != 0 {
        f |= SF;
    }
    if v.count_ones() % 2 == 0 {
        f |= PF;
    }
    f
}

/// SDM Vol. 2A DAA, Operation: (AX after, defined flags after); OF is undefined.
#[expect(
    unused_assignments,
    reason = "mirrors the SDM Operation line by line; its first CF assignment is overwritten by the second step"
)]
fn daa(al: u8, ah: u8, af: bool, cf: bool) -> (u16, u64) {
    let (old_al, old_cf) = (al, cf);
    let (mut al, mut cf, af_out);
    cf = false;
    al = old_al;
    if (al & 0x0f) > 9 || af {
        let (sum, carry) = al.overflowing_add(6);
        al = sum;
        cf = old_cf || carry;
        af_out = true;
    } else {
        af_out = false;
    }
    if old_al > 0x99 || old_cf {
        al = al.wrapping_add(0x60);
        cf = true;
    } else {
        cf = false;
    }
    let f = szp(al) | if cf { CF } else { 0 } | if af_out { AF } else { 0 };
    (u16::from(ah) << 8 | u16::from(al), f)
}

/// SDM Vol. 2A AAA, Operation: AX := AX + 106H when adjusting; OF SF ZF PF undefined.
fn aaa(al: u8, ah: u8, af: bool) -> (u16, u64) {
    let ax = u16::from(ah) << 8 | u16::from(al);
    if (al & 0x0f) > 9 || af {
        let ax = ax.wrapping_add(0x106);
        (ax & 0xff0f, AF | CF)
    } else {
        (ax & 0xff0f, 0)
    }
}

/// SDM Vol. 2A AAS, Operation: AX := AX − 6; AH := AH − 1 when adjusting; OF SF ZF PF undefined.
fn aas(al: u8, ah: u8, af: bool) -> (u16, u64) {
    let ax = u16::from(ah) << 8 | u16::from(al);
    if (al & 0x0f) > 9 || af {
        let ax = ax.wrapping_sub(6);
        let ah = ((ax >> 8) as u8).wrapping_sub(1);
        (u16::from(ah) << 8 | (ax & 0x0f), AF | CF)
    } else {
        (ax & 0xff0f, 0)
    }
}

/// SDM Vol. 2A DAS, Operation; OF is undefined.
fn das(al: u8, ah: u8, af: bool, cf: bool) -> (u16, u64) {
    let (old_al, old_cf) = (al, cf);
    let (mut al, mut cf, mut af_out) = (al, false, false);
    if (al & 0x0f) > 9 || af {
        let (diff, borrow) = al.overflowing_sub(6);
        al = diff;
        cf = old_cf || borrow;
        af_out = true;
    }
    if old_al > 0x99 || old_cf {
        al = al.wrapping_sub(0x60);
        cf = true;
    }
    (u16::from(ah) << 8 | u16::from(al), szp(al) | if cf { CF } else { 0 } | if af_out { AF } else { 0 })
}

/// SDM Vol. 2A AAM imm8 (imm8 ≠ 0): AH = AL / imm8, AL = AL mod imm8; SF ZF PF from AL.
fn aam(ax: u16, base: u8) -> (u16, u64) {
    let al = ax as u8;
    let (q, r) = (al / base, al % base);
    (u16::from(q) << 8 | u16::from(r), szp(r))
}

/// SDM Vol. 2A AAD imm8: AL = (AL + AH × imm8) & 0xFF, AH = 0; SF ZF PF from AL.
fn aad(ax: u16, base: u8) -> (u16, u64) {
    let (al, ah) = (ax as u8, (ax >> 8) as u8);
    let r = al.wrapping_add(ah.wrapping_mul(base));
    (u16::from(r), szp(r))
}

/// One case: instruction, AX, AF, CF.
#[derive(Clone, Copy)]
struct Input {
    ins: Instruction,
    ax: u16,
    af: bool,
    cf: bool,
}

/// A protected-mode batch of `inputs` (EAX = 0x1234_0000 | AX, the rest of RFLAGS set or clear).
fn batch(name: &str, inputs: &[Input]) -> Batch {
    let mut b = Batch::new(name, Mode::Protected);
    for &Input { ins, ax, af, cf } in inputs {
        let fin =
            if af { AF } else { 0 } | if cf { CF } else { 0 } | if af && cf { SF | ZF | PF | OF } else { 0 };
        b.case(
            format!("{ins} ax={ax:#06x} af={} cf={}", u8::from(af), u8::from(cf)),
            undefined_of(&ins),
            move |a| {
                a.mov(eax, 0x1234_0000 | u32::from(ax))?;
                set_flags(a, 32, fin)?;
                a.add_instruction(ins)
            },
        );
    }
    b
}

/// Every AL with every AF/CF (AH varied) for a no-operand instruction.
fn every_al(code: Code) -> Vec<Input> {
    let ins = Instruction::with(code);
    (0..=255u32)
        .flat_map(|al| {
            [(false, false), (true, false), (false, true), (true, true)].map(|(af, cf)| Input {
                ins,
                ax: ((ah_for(al) << 8) | al) as u16,
                af,
                cf,
            })
        })
        .collect()
}

/// Runs `batch` on KVM and returns its slots, or prints why the KVM half is skipped.
fn kvm_or_skip(batch: Batch, what: &str) -> Option<Vec<Slot>> {
    if !testing::select_backends().contains(&BackendKind::Kvm) {
        return None;
    }
    let (report, slots) = batch.run_on(BackendKind::Kvm);
    match report.outcome.stop {
        StopReason::DebugExit { value: 0 } => Some(slots),
        StopReason::CannotRun(why) => {
            eprintln!("skipped: kvm: {what}: this host's KVM cannot run it ({why}); the SDM decides");
            None
        }
        other => panic!("{what} on kvm: {other}"),
    }
}

/// Checks every input against `model` (the SDM's Operation) on the software CPU, and on KVM when
/// it can run the batch. `kvm_defect` names a known defect of this host's KVM: KVM's
/// disagreements with the SDM are then reported out loud instead of failing.
fn check_model(name: &str, inputs: &[Input], kvm_defect: Option<&str>, model: impl Fn(&Input) -> (u16, u64)) {
    let labels = batch(name, inputs).labels();
    let (report, interp) = batch(name, inputs).run_on(BackendKind::Interp);
    assert_eq!(report.outcome.stop, StopReason::DebugExit { value: 0 }, "{name} on interp");
    let kvm = kvm_or_skip(batch(name, inputs), name);
    let mut bad = Vec::new();
    let mut kvm_bad = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let (ax, flags) = model(input);
        let want = (0x1234_0000 | u64::from(ax), flags);
        let got = (interp[i].rax(), interp[i].flags);
        if got != want {
            bad.push(format!(
                "interp {}: eax={:#x} fl={:03x}, SDM {:#x} {:03x}",
                labels[i], got.0, got.1, want.0, want.1
            ));
        }
        if let Some(k) = &kvm {
            let got = (k[i].rax(), k[i].flags);
            if got != want {
                kvm_bad.push(format!(
                    "kvm {}: eax={:#x} fl={:03x}, SDM {:#x} {:03x}",
                    labels[i], got.0, got.1, want.0, want.1
                ));
            }
        }
    }
    // The third opinion: QEMU's TCG, against the same SDM model.
    if let Some(q) = qemu_slots(batch(name, inputs)) {
        let qemu_bad: Vec<String> = inputs
            .iter()
            .enumerate()
            .filter_map(|(i, input)| {
                let (ax, flags) = model(input);
                let want = (0x1234_0000 | u64::from(ax), flags);
                let got = (q[i].rax(), q[i].flags);
                (got != want).then(|| {
                    format!(
                        "qemu {}: eax={:#x} fl={:03x}, SDM {:#x} {:03x}",
                        labels[i], got.0, got.1, want.0, want.1
                    )
                })
            })
            .collect();
        bad.extend(qemu_bad);
    }
    match (kvm_bad.first(), kvm_defect) {
        (Some(first), Some(defect)) => eprintln!(
            "skipped: kvm: {name}: known defect of this host's KVM ({defect}): {} cases differ from the SDM, first {first}",
            kvm_bad.len()
        ),
        _ => bad.extend(kvm_bad),
    }
    assert!(
        bad.is_empty(),
        "{name}: {} cases differ from SDM Vol. 2A {name}:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// The model of a no-operand adjustment applied to an [`Input`].
fn adjust(f: fn(u8, u8, bool, bool) -> (u16, u64)) -> impl Fn(&Input) -> (u16, u64) {
    move |i| f(i.ax as u8, (i.ax >> 8) as u8, i.af, i.cf)
}

#[test]
fn bcd_daa_matches_the_sdm_for_every_al_af_cf() {
    check_model("daa", &every_al(Code::Daa), None, adjust(daa));
}

#[test]
fn bcd_das_matches_the_sdm_for_every_al_af_cf() {
    check_model("das", &every_al(Code::Das), None, adjust(das));
}

#[test]
fn bcd_aaa_matches_the_sdm_for_every_al_af_cf() {
    check_model("aaa", &every_al(Code::Aaa), None, adjust(|al, ah, af, _| aaa(al, ah, af)));
}

#[test]
fn bcd_aas_matches_the_sdm_for_every_al_af_cf() {
    check_model("aas", &every_al(Code::Aas), None, adjust(|al, ah, af, _| aas(al, ah, af)));
}

#[test]
fn bcd_das_every_al_af_cf_matches_kvm() {
    batch("bcd-das", &every_al(Code::Das)).check();
}

/// AAM with bases 10, 16, 7, 1, 255 over AL; AAD with bases 10, 16, 0, 255 over a grid of AH, AL.
fn aam_aad_inputs() -> Vec<Input> {
    let mut v = Vec::new();
    for base in [10u32, 16, 7, 1, 255] {
        let ins = Instruction::with1(Code::Aam_imm8, base).unwrap_or_default();
        for al in (0..=255u16).step_by(3).chain([255]) {
            v.push(Input { ins, ax: 0xff00 | al, af: true, cf: true });
        }
    }
    for base in [10u32, 16, 0, 255] {
        let ins = Instruction::with1(Code::Aad_imm8, base).unwrap_or_default();
        for ah in (0..=255u16).step_by(17) {
            for al in [0u16, 1, 9, 0x7f, 0x80, 0xff] {
                v.push(Input { ins, ax: ah << 8 | al, af: true, cf: true });
            }
        }
    }
    v
}

#[test]
fn bcd_aam_aad_with_several_bases_match_the_sdm() {
    check_model(
        "aam-aad",
        &aam_aad_inputs(),
        Some("AAM/AAD set SF ZF PF from all of EAX instead of AL"),
        |i| {
            let base = i.ins.immediate8();
            if i.ins.code() == Code::Aam_imm8 {
                aam(i.ax, base)
            } else {
                aad(i.ax, base)
            }
        },
    );
}

#[test]
fn bcd_aam_zero_raises_divide_error() {
    // SDM Vol. 2A AAM: "IF imm8 = 0 THEN #DE".
    let guest = GuestBuilder::new(Mode::Protected)
        .name("aam-0")
        .code(|a| {
            a.add_instruction(Instruction::with1(Code::Aam_imm8, 0u32)?)?;
            duet::fixtures::asm::exit(a, 1)
        })
        .build()
        .unwrap();
    let mut reports = Vec::new();
    for kind in testing::select_backends() {
        let r = run(kind, &guest);
        match &r.outcome.stop {
            StopReason::Exception(e) => assert_eq!((e.vector, e.rip), (0, guest.state.regs.rip), "{kind}"),
            other => panic!("aam 0 on {kind}: {other}"),
        }
        reports.push(r);
    }
    if let [kvm, interp] = &reports[..] {
        let diff = compare(kvm, interp);
        assert!(diff.is_empty(), "aam 0: KVM and the software CPU differ:\n{diff}");
    }
}

#[test]
fn bcd_all_six_are_invalid_in_64bit_mode() {
    // SDM Vol. 2A DAA/DAS/AAA/AAS/AAM/AAD: "IF 64-Bit Mode THEN #UD".
    for bytes in [[0x27u8, 0x90], [0x2f, 0x90], [0x37, 0x90], [0x3f, 0x90], [0xd4, 0x0a], [0xd5, 0x0a]] {
        let guest = GuestBuilder::new(Mode::Long).name("bcd-64").image(bytes.to_vec()).build().unwrap();
        let mut reports = Vec::new();
        for kind in testing::select_backends() {
            let r = run(kind, &guest);
            match &r.outcome.stop {
                StopReason::Exception(e) => {
                    assert_eq!((e.vector, e.rip), (6, guest.state.regs.rip), "{bytes:02x?} on {kind}")
                }
                StopReason::CannotRun(why) if kind == BackendKind::Kvm => {
                    eprintln!("skipped: kvm: {bytes:02x?} in 64-bit mode: this host's KVM cannot run it ({why}); the SDM decides");
                    continue;
                }
                other => panic!("{bytes:02x?} on {kind}: {other}"),
            }
            reports.push(r);
        }
        if let [kvm, interp] = &reports[..] {
            let diff = compare(kvm, interp);
            assert!(diff.is_empty(), "{bytes:02x?}: KVM and the software CPU differ:\n{diff}");
        }
    }
}
