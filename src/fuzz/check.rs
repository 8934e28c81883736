//! Deciding one case: run it on both backends (or against its recorded result) and judge.

use std::time::Duration;

use duet_core::{StateDiff, StopReason};

use super::case::{parse_hex, Case, Outcome, Parsed};
use super::exec::{Executor, Run};
use super::judge::{self, HostLimit, OutcomeLimit, Reference};
use super::layout;
use super::FuzzError;
use crate::backends::BackendKind;

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
        diff: StateDiff,
    },
    /// The hardware backend cannot decide this case on this host (a known limit, or it could
    /// not run it), and no reference decided it either.
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

/// Runs cases on the interpreter and, where usable, on KVM, reusing their machines.
pub struct Checker {
    /// KVM, when usable.
    pub kvm: Option<Executor>,
    /// The interpreter.
    pub interp: Executor,
    /// Known limits of this host's KVM.
    pub limits: &'static [HostLimit],
    /// Known limits of this host's KVM recognised from the outcomes.
    pub outcome_limits: &'static [OutcomeLimit],
    /// The third opinion.
    pub reference: Box<dyn Reference>,
}

impl Checker {
    /// A checker on this host: KVM when `use_kvm` and usable, the interpreter always.
    pub fn new(use_kvm: bool, timeout: Duration) -> Self {
        let kvm = (use_kvm && BackendKind::Kvm.availability().is_available())
            .then(|| Executor::new(BackendKind::Kvm, timeout));
        let pvm = judge::kvm_is_pvm();
        let limits = if pvm { judge::KVM_PVM_LIMITS } else { &[] };
        let outcome_limits = if pvm { judge::KVM_PVM_OUTCOME_LIMITS } else { &[] };
        Checker {
            kvm,
            interp: Executor::new(BackendKind::Interp, timeout),
            limits,
            outcome_limits,
            reference: Box::new(judge::NoReference),
        }
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
        if let StopReason::Unsupported(i) = &interp.stop {
            // Grouped by what, not where: addresses are cut off.
            let what = i.mnemonic.split(" 0x").next().unwrap_or(&i.mnemonic).to_string();
            return Ok(Verdict::Unsupported { what });
        }
        let Some(kvm_exec) = self.kvm.as_mut() else { return Ok(Verdict::InterpOnly) };
        if let Some(l) = judge::host_limit(case, &p.code, self.limits)
            .or_else(|| judge::host_limit(case, &p.code, judge::HOST_SPECIFIC_LIMITS))
        {
            return Ok(self.ask_reference(
                case,
                &interp,
                format!("known KVM limit `{}`: {}", l.name, l.reason),
            ));
        }
        let kvm = kvm_exec.run(case, &p, &state)?;
        if let StopReason::CannotRun(c) = &kvm.stop {
            let what = c
                .instruction
                .as_ref()
                .map_or("?".to_string(), |i| i.mnemonic.split_whitespace().next().unwrap_or("?").to_string());
            let reason = c.reason.split(" (").next().unwrap_or(&c.reason);
            return Ok(self.ask_reference(case, &interp, format!("KVM cannot run `{what}`: {reason}")));
        }
        match (&kvm.stop, &interp.stop) {
            (StopReason::Deadline, StopReason::Deadline) => return Ok(Verdict::Hung),
            (StopReason::Deadline, _) => {
                let why = "KVM reached the deadline where the interpreter finished".to_string();
                return Ok(self.ask_reference(case, &interp, why));
            }
            _ => {}
        }
        let diff = compare_runs(&p, case, ("kvm", &kvm.outcome), ("interp", &interp.outcome));
        if diff.is_empty() {
            Ok(Verdict::Agree)
        } else if let Some(l) =
            judge::outcome_limit(case, &kvm.outcome, &interp.outcome, &diff, self.outcome_limits)
        {
            Ok(self.ask_reference(case, &interp, format!("known KVM limit `{}`: {}", l.name, l.reason)))
        } else {
            Ok(Verdict::Diverge { kvm: Box::new(kvm), interp: Box::new(interp), diff })
        }
    }

    /// Asks the third opinion about a case KVM cannot decide; says so when it cannot either.
    fn ask_reference(&self, case: &Case, interp: &Run, why: String) -> Verdict {
        super::reference::ask(&*self.reference, case, &interp.outcome, why)
    }

    /// For a divergence: which side the reference agrees with, in one line.
    pub fn third_opinion(&self, case: &Case, kvm: &Outcome, interp: &Outcome) -> String {
        super::reference::third_opinion(&*self.reference, case, kvm, interp)
    }
}

/// Compares two outcomes of `case`, reading unchanged words from its initial image.
pub fn compare_runs(p: &Parsed, case: &Case, left: (&str, &Outcome), right: (&str, &Outcome)) -> StateDiff {
    let img = layout::base_image(case.mode).map(|base| layout::initial_image(&base, p)).unwrap_or_default();
    let word = |addr: u64| {
        let a = addr as usize;
        img.get(a..a + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let images_undef = judge::static_undefined(case.mode, &p.code);
    judge::compare_with(left, right, &word, images_undef)
}

/// Checks the interpreter against the result recorded in `case`: the diff (empty when equal).
pub fn against_recorded(
    interp: &mut Executor,
    case: &Case,
    file: &str,
) -> Result<Option<StateDiff>, FuzzError> {
    let Some(expected) = &case.expected else { return Ok(None) };
    let (p, state) = layout::prepare(case, file)?;
    let run = interp.run(case, &p, &state)?;
    let _ = parse_hex(&expected.outcome.rflags_undefined);
    Ok(Some(compare_runs(&p, case, (&expected.source, &expected.outcome), ("interp", &run.outcome))))
}

/// Compares a reference's outcome with a backend's, leaving out exits (the reference has none).
pub fn against_reference(
    p: &Parsed,
    case: &Case,
    name: &str,
    reference: &Outcome,
    other: (&str, &Outcome),
) -> StateDiff {
    let mut o = other.1.clone();
    o.exits.clear();
    compare_runs(p, case, (name, reference), (other.0, &o))
}
