//! Deciding one case: run it on both backends (or against its recorded result) and judge.

use std::time::Duration;

use duet_core::StopReason;

use super::case::{Case, Outcome, Parsed};
use super::diff::Diff;
use super::exec::{Executor, Run};
use super::judge::{self, HostLimit, Reference, Standing, Undefined};
use super::layout;
use super::outcome::{cannot_run_text, short_instruction};
use super::FuzzError;
use crate::backends::BackendKind;
use crate::host::Host;

/// What checking one case found.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// KVM and the interpreter agree.
    Agree,
    /// They differ: both runs and the difference.
    Diverge {
        /// The hardware run.
        kvm: Box<Run>,
        /// The software run.
        interp: Box<Run>,
        /// What differs.
        diff: Diff,
    },
    /// The hardware backend cannot decide this case on this host (a known limit, a limit whose
    /// host is unknown, or it could not run it), and no reference decided it either.
    Undecided {
        /// The limit or failure, in words.
        why: String,
    },
    /// The interpreter stopped at an instruction it does not implement.
    Unsupported {
        /// The instruction.
        what: String,
    },
    /// Both backends reached the deadline: the case hangs (not comparable).
    Hung,
    /// No hardware backend here: only the interpreter ran.
    InterpOnly,
}

/// What the judge makes of the two runs of one case on a host (before any third opinion).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The runs agree.
    Agree,
    /// Both reached the deadline.
    Hung,
    /// KVM on this host cannot decide the case: why, in words.
    Undecided(String),
    /// The runs differ and nothing known about the host explains it.
    Diverge(Diff),
}

/// Judges the runs `kvm` and `interp` of the case `p` on `host`: pure, so a test can say what an
/// Intel host would decide.
///
/// A limit verified on this host makes the case undecided; a limit verified only on another
/// vendor's host with this kind of KVM makes it undecided (`unknown host`) only when the runs
/// differ; on bare metal no KVM limit applies.
pub fn decide(host: Host, p: &Parsed, kvm: &Outcome, interp: &Outcome) -> Decision {
    let before = judge::instruction_limit(host, p);
    if let Some(m) = before.filter(|m| m.standing == Standing::Known) {
        return Decision::Undecided(m.why(host));
    }
    match (&kvm.stop, &interp.stop) {
        (StopReason::CannotRun(c), _) => {
            let (what, reason) = cannot_run_text(c);
            return Decision::Undecided(format!("KVM cannot run `{what}`: {reason}"));
        }
        (StopReason::Deadline, StopReason::Deadline) => return Decision::Hung,
        (StopReason::Deadline, _) => {
            return Decision::Undecided("KVM reached the deadline where the interpreter finished".into())
        }
        _ => {}
    }
    let diff = compare_runs(p, ("kvm", kvm), ("interp", interp));
    if diff.is_empty() {
        return Decision::Agree;
    }
    let after = judge::outcome_limit(host, p, kvm, interp, &diff);
    let known = after.filter(|m| m.standing == Standing::Known);
    // A program that rewrote its own code may have made an instruction a limit names (RDTSC
    // written by an ADC into the opcode byte): scan the code each run ended with too.
    let rewritten = [kvm, interp].into_iter().find_map(|o| {
        let code = code_after(p, o)?;
        judge::instruction_limit(host, &Parsed { code, ..p.clone() })
    });
    match known.or(before).or(rewritten).or(after) {
        Some(m) => Decision::Undecided(m.why(host)),
        None => Decision::Diverge(diff),
    }
}

/// The code bytes of `p` as the run `o` left them, when the program wrote into its own code.
fn code_after(p: &Parsed, o: &Outcome) -> Option<Vec<u8>> {
    let start = layout::CODE_ADDR;
    let end = start + p.code.len() as u64;
    let mut code = p.code.clone();
    for (&addr, &word) in o.memory.range(start.saturating_sub(7)..end) {
        for (i, b) in word.to_le_bytes().into_iter().enumerate() {
            let at = addr + i as u64;
            if (start..end).contains(&at) {
                code[(at - start) as usize] = b;
            }
        }
    }
    (code != p.code).then_some(code)
}

/// Runs cases on the interpreter and, where usable, on KVM, reusing their machines.
pub struct Checker {
    /// KVM, when usable.
    pub kvm: Option<Executor>,
    /// The interpreter.
    pub interp: Executor,
    /// The host KVM runs on: its vendor and KVM kind decide which limits hold.
    pub host: Host,
    /// The third opinion.
    pub reference: Box<dyn Reference>,
}

impl Checker {
    /// A checker on this host: KVM when `use_kvm` and usable, the interpreter always.
    pub fn new(use_kvm: bool, timeout: Duration) -> Self {
        let kvm = (use_kvm && BackendKind::Kvm.availability().is_available())
            .then(|| Executor::new(BackendKind::Kvm, timeout));
        Checker {
            kvm,
            interp: Executor::new(BackendKind::Interp, timeout),
            host: Host::this(),
            reference: Box::new(judge::NoReference),
        }
    }

    /// The first limit known on this host that `case`'s program runs into (what a campaign that
    /// avoids host limits redraws for); `None` for a case that does not parse.
    pub fn known_limit(&self, case: &Case) -> Option<HostLimit> {
        let p = case.parse("case").ok()?;
        judge::host_limit(&p, &super::limits::known_instruction_limits(self.host))
    }

    /// Uses the QEMU reference as the third opinion when it is usable here; says why not otherwise.
    pub fn use_qemu(&mut self) -> Option<String> {
        match super::reference::QemuReference::available(Duration::from_secs(20)) {
            Ok(r) => {
                self.reference = Box::new(r);
                None
            }
            Err(why) => Some(why),
        }
    }

    /// Checks `case` (its file name, for errors, is `file`).
    pub fn check(&mut self, case: &Case, file: &str) -> Result<Verdict, FuzzError> {
        let (p, state) = layout::prepare(case, file)?;
        let interp = self.interp.run(case, &p, &state)?;
        match &interp.stop {
            // Grouped by what, not where: addresses are cut off.
            StopReason::Unsupported(i) => return Ok(Verdict::Unsupported { what: short_instruction(i) }),
            // The software CPU runs code from RAM only; KVM fetches from the MMIO bus (all ones).
            StopReason::UnbackedFetch { .. } => {
                return Ok(Verdict::Unsupported {
                    what: "instruction fetch from an address no RAM backs".into(),
                })
            }
            _ => {}
        }
        let Some(kvm_exec) = self.kvm.as_mut() else {
            // Without KVM the reference, when one was asked for, is the only other opinion.
            return Ok(if self.reference.asks() {
                self.ask_reference(case, &p, &interp, "no KVM on this host".into())
            } else {
                Verdict::InterpOnly
            });
        };
        if let Some(m) = judge::instruction_limit(self.host, &p).filter(|m| m.standing == Standing::Known) {
            // KVM is not run: the case is known not to be decided by it here.
            return Ok(self.ask_reference(case, &p, &interp, m.why(self.host)));
        }
        let kvm = kvm_exec.run(case, &p, &state)?;
        match decide(self.host, &p, &kvm.outcome, &interp.outcome) {
            Decision::Agree => Ok(Verdict::Agree),
            Decision::Hung => Ok(Verdict::Hung),
            Decision::Undecided(why) => Ok(self.ask_reference(case, &p, &interp, why)),
            Decision::Diverge(diff) => {
                Ok(Verdict::Diverge { kvm: Box::new(kvm), interp: Box::new(interp), diff })
            }
        }
    }

    /// Asks the third opinion about a case KVM cannot decide; says so when it cannot either.
    fn ask_reference(&self, case: &Case, _p: &Parsed, interp: &Run, why: String) -> Verdict {
        super::reference::ask(&*self.reference, case, &interp.outcome, why)
    }

    /// For a divergence: which side the reference agrees with, in one line.
    pub fn third_opinion(&self, case: &Case, kvm: &Outcome, interp: &Outcome) -> String {
        super::reference::third_opinion(&*self.reference, case, kvm, interp)
    }
}

/// Compares two outcomes of the case `p`, reading unchanged words from its initial image and
/// masking the flags either side reports undefined.
pub fn compare_runs(p: &Parsed, left: (&str, &Outcome), right: (&str, &Outcome)) -> Diff {
    compare_runs_masked(p, left, right, left.1.rflags_undefined | right.1.rflags_undefined)
}

/// [`compare_runs`] masking the flags `undefined` at the end of the run (plus, in pushed FLAGS
/// images, those any instruction of the program may leave undefined).
pub fn compare_runs_masked(
    p: &Parsed,
    left: (&str, &Outcome),
    right: (&str, &Outcome),
    undefined: u64,
) -> Diff {
    let img = layout::base_image(p.mode).map(|base| layout::initial_image(&base, p)).unwrap_or_default();
    let word = |addr: u64| {
        let a = addr as usize;
        img.get(a..a.saturating_add(8)).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let mask = Undefined { at_end: undefined, in_images: judge::static_undefined(p) };
    judge::compare_masked(left, right, &word, mask)
}

/// Compares a KVM run with a KVM recording of the same case. Neither carries an undefined-flags
/// mask (hardware does not say which flags it left undefined): the software CPU's run of the
/// case, `interp`, does — iced-x86's facts for each instruction that ran — and its mask is used,
/// so a flag the architecture leaves undefined (AF after a logical instruction, say) may differ
/// between two hosts' silicon without a difference being reported.
pub fn kvm_against_recorded(p: &Parsed, recorded: &Outcome, kvm: &Outcome, interp: &Outcome) -> Diff {
    let undefined = recorded.rflags_undefined | kvm.rflags_undefined | interp.rflags_undefined;
    compare_runs_masked(p, ("recorded", recorded), ("kvm", kvm), undefined)
}

/// Checks the interpreter against the result recorded in `case` (run under the case's own CPUID
/// profile): the diff (empty when equal), or `None` when the case records no result.
pub fn against_recorded(interp: &mut Executor, case: &Case, file: &str) -> Result<Option<Diff>, FuzzError> {
    Ok(interp_against_recorded(interp, case, file)?.map(|(d, _)| d))
}

/// [`against_recorded`], also handing back the interpreter's run (its undefined-flags mask is
/// the one [`kvm_against_recorded`] needs).
pub fn interp_against_recorded(
    interp: &mut Executor,
    case: &Case,
    file: &str,
) -> Result<Option<(Diff, Run)>, FuzzError> {
    let Some(expected) = &case.expected else { return Ok(None) };
    let (p, state) = layout::prepare(case, file)?;
    let run = interp.run(case, &p, &state)?;
    let source = expected.source.to_string();
    let d = compare_runs(&p, (&source, &expected.outcome), ("interp", &run.outcome));
    Ok(Some((d, run)))
}

/// Compares a reference's outcome with a backend's, leaving out exits (the reference has none).
pub fn against_reference(p: &Parsed, name: &str, reference: &Outcome, other: (&str, &Outcome)) -> Diff {
    let mut o = other.1.clone();
    o.exits.clear();
    compare_runs(p, (name, reference), (other.0, &o))
}

#[cfg(test)]
mod tests {
    use duet_core::layout::ExceptionReport;
    use duet_core::Vendor;

    use super::*;
    use crate::fuzz::case::FuzzMode;
    use crate::fuzz::limits::{AMD_PVM, INTEL_PVM};
    use crate::fuzz::outcome::{vector, Field};
    use crate::host::KvmKind;

    const INTEL_VMX: Host = Host { vendor: Vendor::Intel, kvm: KvmKind::Vmx };
    const AMD_SVM: Host = Host { vendor: Vendor::Amd, kvm: KvmKind::Svm };

    fn parsed(mode: FuzzMode, code: &[u8]) -> Parsed {
        Parsed::of_code(mode, code)
    }

    fn fault(vector: u8, rip: u64) -> Outcome {
        Outcome::stopped(StopReason::Exception(ExceptionReport { vector, error_code: 0, rip }))
    }

    fn undecided(d: &Decision) -> &str {
        match d {
            Decision::Undecided(why) => why,
            other => panic!("not undecided: {other:?}"),
        }
    }

    #[test]
    fn an_intel_only_limit_explains_the_intel_divergence_and_is_unknown_elsewhere() {
        // SYSENTER with IA32_SYSENTER_CS = 0 in 64-bit ring 3: the SDM's #GP(0) (Vol. 2B SYSENTER)
        // on the software CPU under an Intel profile, kvm_pvm on Intel raises #UD.
        let p = parsed(FuzzMode::Long64Ring3, &[0x0f, 0x34, 0xe6, 0xf4]);
        let (kvm, interp) = (fault(vector::UD, 0x8000), fault(vector::GP, 0x8000));
        let known = decide(INTEL_PVM, &p, &kvm, &interp);
        assert!(undecided(&known).starts_with("known KVM limit `sysenter-intel-pvm`: "), "{known:?}");
        // kvm_pvm on AMD: nobody verified the limit there; the case is undecided, not a divergence.
        let unknown = decide(AMD_PVM, &p, &kvm, &interp);
        assert!(
            undecided(&unknown).starts_with(
                "unknown host: `sysenter-intel-pvm` was verified on Intel kvm_pvm (this host is AuthenticAMD with kvm_pvm)"
            ),
            "{unknown:?}"
        );
        // Bare metal is the silicon: no limit, the difference is a divergence.
        assert!(matches!(decide(INTEL_VMX, &p, &kvm, &interp), Decision::Diverge(_)));
        // Where the runs agree, no limit is needed.
        assert_eq!(decide(AMD_PVM, &p, &kvm, &kvm), Decision::Agree);
    }

    #[test]
    fn an_amd_only_instruction_limit_is_unknown_on_intel_only_when_the_runs_differ() {
        // CPUID under kvm_pvm shows the host's leaves: verified on the AMD host only.
        let p = parsed(FuzzMode::Long64, &[0x0f, 0xa2, 0xe6, 0xf4]);
        let kvm = Outcome::stopped(StopReason::DebugExit { value: 0 });
        let mut interp = kvm.clone();
        interp.state.insert(Field::Gpr(0), 0x16);
        let known = decide(AMD_PVM, &p, &kvm, &kvm);
        assert!(undecided(&known).starts_with("known KVM limit `cpuid-host-leaves`"), "{known:?}");
        assert_eq!(decide(INTEL_PVM, &p, &kvm, &kvm), Decision::Agree, "an Intel host decides what agrees");
        let unknown = decide(INTEL_PVM, &p, &kvm, &interp);
        assert!(
            undecided(&unknown).starts_with("unknown host: `cpuid-host-leaves` was verified on AMD kvm_pvm")
        );
        assert!(matches!(decide(AMD_SVM, &p, &kvm, &interp), Decision::Diverge(_)));
    }

    #[test]
    fn a_limit_verified_on_both_vendors_is_known_on_both() {
        // DAA under kvm_pvm: an emulation failure on Intel and AMD (DEVELOPERS.md, first table).
        let p = parsed(FuzzMode::Prot32, &[0x27, 0xe6, 0xf4]);
        let kvm = Outcome::stopped(StopReason::DebugExit { value: 0 });
        for host in [INTEL_PVM, AMD_PVM] {
            let d = decide(host, &p, &kvm, &kvm);
            assert!(undecided(&d).starts_with("known KVM limit `bcd-arpl-bound`"), "{host}: {d:?}");
        }
        assert_eq!(decide(INTEL_VMX, &p, &kvm, &kvm), Decision::Agree);
    }

    #[test]
    fn an_amd_only_outcome_limit_is_unknown_on_an_intel_kvm_pvm_host() {
        // #AC although CR0.AM = 0 (kvm_pvm runs ring 3 with the host's CR0.AM): found on AMD.
        let p = parsed(FuzzMode::Long64Ring3, &[0x8b, 0x07, 0xe6, 0xf4]);
        let (kvm, interp) = (fault(vector::AC, 0x8000), fault(vector::GP, 0x8002));
        let known = decide(AMD_PVM, &p, &kvm, &interp);
        assert!(undecided(&known).starts_with("known KVM limit `alignment-check-without-cr0-am`"));
        let unknown = decide(INTEL_PVM, &p, &kvm, &interp);
        assert!(undecided(&unknown)
            .starts_with("unknown host: `alignment-check-without-cr0-am` was verified on AMD"));
        assert!(matches!(decide(INTEL_VMX, &p, &kvm, &interp), Decision::Diverge(_)));
    }

    #[test]
    fn amd_only_vendor_limits_name_kvm_pvm_s_intel_readings_on_an_amd_host() {
        use crate::fuzz::outcome::{SegPart, SegReg};
        // REX.W LSS r10, [edi+5Ch]: kvm_pvm reads m16:64 whatever the vendor; AMD reads m16:32.
        // (In ring 3, `ring3-segment-loads` already covers LSS.)
        let p = parsed(FuzzMode::Long64, &[0x67, 0x4c, 0x0f, 0xb2, 0x57, 0x5c, 0xe6, 0xf4]);
        let (kvm, interp) = (fault(vector::GP, 0x8000), fault(vector::GP, 0x8000));
        let mut interp_m1632 = interp.clone();
        interp_m1632.stop =
            StopReason::Exception(ExceptionReport { vector: vector::GP, error_code: 0x18, rip: 0x8000 });
        assert!(undecided(&decide(AMD_PVM, &p, &kvm, &interp_m1632)).contains("`far-pointer-rex-w`"));
        assert_eq!(
            decide(AMD_PVM, &p, &kvm, &interp),
            Decision::Undecided(
                judge::instruction_limit(AMD_PVM, &p).map(|m| m.why(AMD_PVM)).unwrap_or_default()
            ),
            "a known instruction limit holds whatever the runs did"
        );
        assert!(
            matches!(decide(AMD_SVM, &p, &kvm, &interp_m1632), Decision::Diverge(_)),
            "bare metal decides"
        );
        // The software CPU decodes an AMD case's REX.W LSS as m16:32; the limit is about KVM's
        // emulator, which decodes Intel's way: it is found in an AMD case too.
        let amd = Parsed { vendor: Vendor::Amd, ..p.clone() };
        assert!(undecided(&decide(AMD_PVM, &amd, &kvm, &interp_m1632)).contains("`far-pointer-rex-w`"));

        // mov fs, ax with AX = 0 in 64-bit mode: the silicon here clears FS.base, an AMD profile
        // without NullSelectorClearsBase keeps it.
        let p = parsed(FuzzMode::Long64, &[0x8e, 0xe0, 0xe6, 0xf4]);
        let mut kvm = Outcome::stopped(StopReason::DebugExit { value: 0 });
        kvm.state.insert(Field::Seg(SegReg::Fs, SegPart::Selector), 0);
        kvm.state.insert(Field::Seg(SegReg::Fs, SegPart::Base), 0);
        let mut interp = kvm.clone();
        interp.state.insert(Field::Seg(SegReg::Fs, SegPart::Base), 0xa000);
        assert!(undecided(&decide(AMD_PVM, &p, &kvm, &interp))
            .starts_with("known KVM limit `null-selector-clears-base`"));
        // The other way round (the software CPU cleared what KVM kept) is no such thing.
        assert!(matches!(decide(AMD_PVM, &p, &interp, &kvm), Decision::Diverge(_)));
    }

    #[test]
    fn an_instruction_a_program_writes_into_its_own_code_is_scanned_for_limits() {
        // `adc byte [di-0Dh], 1Eh` turned a LOCK prefix (F0) into 0F, making `0F 31` (RDTSC) of
        // the next instruction (fuzz seed 1, real case 17697): the two runs read different clocks.
        let code = [0x90, 0x90, 0xf0, 0x31, 0x64, 0x99, 0xe6, 0xf4];
        let p = parsed(FuzzMode::Real, &code);
        let mut kvm = Outcome::stopped(StopReason::DebugExit { value: 0xcf });
        let mut rewritten = code;
        rewritten[2] = 0x0f;
        kvm.memory.insert(layout::CODE_ADDR, u64::from_le_bytes(rewritten));
        kvm.state.insert(Field::Gpr(0), 0x485b_bbcf);
        let mut interp = kvm.clone();
        interp.stop = StopReason::DebugExit { value: 8 };
        interp.state.insert(Field::Gpr(0), 8);
        assert!(undecided(&decide(AMD_PVM, &p, &kvm, &interp))
            .starts_with("known KVM limit `time-stamp-counter`"));
        // The same difference without the rewrite is a divergence.
        kvm.memory.clear();
        interp.memory.clear();
        assert!(matches!(decide(AMD_PVM, &p, &kvm, &interp), Decision::Diverge(_)));
    }

    /// A reference that answers every case with one fixed outcome.
    struct Fixed(Outcome);

    impl Reference for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn run(&self, _case: &Case) -> Result<Outcome, String> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn without_kvm_a_reference_that_was_asked_for_decides() {
        use crate::fuzz::case::{hex_bytes, CASE_FORMAT};
        // mov eax, 7; out 0xf4, al; cli; hlt — in 32-bit protected mode, a debug exit of 7.
        let code = [0xb8, 7, 0, 0, 0, 0xe6, 0xf4, 0xfa, 0xf4];
        let case = Case {
            format: CASE_FORMAT,
            mode: FuzzMode::Prot32,
            note: String::new(),
            regs: Default::default(),
            rflags: "0x2".into(),
            segments: Default::default(),
            code: hex_bytes(&code),
            disasm: Vec::new(),
            data: String::new(),
            cpuid: None,
            expected: None,
        };
        let timeout = Duration::from_secs(5);
        let mut checker = Checker {
            kvm: None,
            interp: Executor::new(BackendKind::Interp, timeout),
            host: AMD_SVM,
            reference: Box::new(judge::NoReference),
        };
        assert!(matches!(checker.check(&case, "case"), Ok(Verdict::InterpOnly)));
        let (p, state) = layout::prepare(&case, "case").expect("the case prepares");
        let interp = checker.interp.run(&case, &p, &state).expect("the software CPU runs it").outcome;
        assert_eq!(interp.stop, StopReason::DebugExit { value: 7 }, "SDM Vol. 2A MOV, Vol. 2B OUT");
        // A reference logs no port exits (QEMU sees none of duet's devices).
        let mut same = interp;
        same.exits.clear();
        checker.reference = Box::new(Fixed(same.clone()));
        assert!(matches!(checker.check(&case, "case"), Ok(Verdict::Agree)));
        let mut other = same;
        other.state.insert(Field::Gpr(0), 8);
        checker.reference = Box::new(Fixed(other));
        match checker.check(&case, "case") {
            Ok(Verdict::Undecided { why }) => {
                assert!(why.starts_with("fixed disagrees with the interpreter"), "{why}");
                assert!(why.contains("no KVM on this host"), "{why}");
            }
            other => panic!("a disagreeing reference must leave the case undecided: {other:?}"),
        }
    }
}
