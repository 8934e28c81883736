//! The QEMU reference as the fuzzer's third opinion: a case run under QEMU TCG from the same
//! start state, its outcome in the fuzzer's comparable form.
//!
//! QEMU sees no duet devices: it logs no port or MMIO exits and its unassigned memory reads 0
//! (duet's recorder returns a pattern), so exits are not compared against it and a case that
//! reads MMIO can differ for that reason alone (the `no-mmio-device` departure).
//!
//! [`ask`] runs a case KVM could not decide and judges QEMU's answer against the software CPU:
//! equal, different only where QEMU departs from the SDM ([`departures::QEMU_DEPARTURES`]),
//! different, or no answer.

use std::time::Duration;

use duet_core::vm_memory::{Bytes, GuestAddress};

use super::case::{Case, Outcome};
use super::check::{against_reference, Verdict};
use super::diff::Diff;
use super::judge::Reference;
use super::layout::{self, CODE_ADDR, DATA_ADDR, RAM_SIZE};

pub mod departures;

use departures::{explain, Departure, Seen, QEMU_DEPARTURES};

/// duet-qemu as a [`Reference`].
#[derive(Clone, Copy, Debug)]
pub struct QemuReference {
    /// Wall-clock budget of one QEMU run.
    pub timeout: Duration,
}

impl QemuReference {
    /// The reference when `qemu-system-x86_64` is usable here, else why not.
    pub fn available(timeout: Duration) -> Result<Self, String> {
        match duet_qemu::availability() {
            duet_core::Availability::Available(_) => Ok(QemuReference { timeout }),
            duet_core::Availability::Unavailable(why) => Err(why),
        }
    }
}

impl Reference for QemuReference {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn run(&self, case: &Case) -> Result<Outcome, String> {
        let (p, state) = layout::prepare(case, "case").map_err(|e| e.to_string())?;
        let mut guest = layout::base_guest(case.mode).map_err(|e| e.to_string())?;
        guest.load(CODE_ADDR, p.code.clone());
        guest.load(DATA_ADDR, p.data.clone());
        guest.state = state;
        let profile = super::exec::profile_of(case.cpuid.as_ref()).map_err(|e| e.to_string())?;
        let run = duet_qemu::run(&guest, &profile, self.timeout).map_err(|e| e.to_string())?;
        // A note says the state is not exactly the one at the end of the run: no opinion. After
        // a triple fault only the stop and the exits are compared, so a note on the state is moot.
        if let (Some(note), false) = (run.notes.first(), run.outcome.stop == duet_core::StopReason::Shutdown)
        {
            return Err(format!("QEMU's final state is approximate: {note}"));
        }
        let mut now = vec![0u8; RAM_SIZE as usize];
        run.memory.read_slice(&mut now, GuestAddress(0)).map_err(|e| e.to_string())?;
        let base = layout::base_image(case.mode).map_err(|e| e.to_string())?;
        let memory = super::exec::memory_changes(&layout::initial_image(&base, &p), &now);
        Ok(super::exec::outcome(&run.outcome.stop, &run.outcome.state, 0, memory, Vec::new()))
    }
}

/// What the third opinion says about a case, next to one backend's outcome.
#[derive(Clone, Debug)]
pub enum Answer {
    /// The same outcome.
    Agrees,
    /// Different only where the reference departs from the SDM: these departures explain every
    /// differing row.
    Departs(Vec<&'static Departure>),
    /// Different where no departure explains it: the rows left unexplained.
    Disagrees(Diff),
    /// The reference gave no answer, and why.
    NoAnswer(String),
}

impl Answer {
    /// One line for verdicts and summaries, naming `reference` and the `other` side.
    pub fn line(&self, reference: &str, other: &str) -> String {
        match self {
            Answer::Agrees => format!("{reference} agrees with {other}"),
            Answer::Departs(d) => {
                let names: Vec<String> = d.iter().map(|d| format!("`{}`", d.name)).collect();
                format!(
                    "{reference} departs from the SDM here ({}): not counted as a disagreement",
                    names.join(", ")
                )
            }
            Answer::Disagrees(diff) => {
                let mut fields: Vec<String> = diff.rows.iter().map(|r| r.class()).collect();
                fields.dedup();
                format!("{reference} disagrees with {other} ({})", fields.join(", "))
            }
            Answer::NoAnswer(why) => format!("{reference} gave no answer: {why}"),
        }
    }
}

/// Judges a reference's outcome against `other` (`(name, outcome)`) for `case`: equal, explained
/// by the reference's departures, or not. The reference gets `other`'s undefined-flags mask
/// (neither KVM nor QEMU says which flags are undefined; the software CPU does).
pub fn judge(case: &Case, reference: (&str, &Outcome), other: (&str, &Outcome)) -> Answer {
    let Ok(p) = case.parse("case") else { return Answer::NoAnswer("the case does not parse".into()) };
    let mut r = reference.1.clone();
    r.rflags_undefined = other.1.rflags_undefined;
    let diff = against_reference(&p, reference.0, &r, other);
    if diff.is_empty() {
        return Answer::Agrees;
    }
    let seen = Seen { case, parsed: &p, qemu: &r, interp: other.1 };
    match explain(&seen, &diff.rows, QEMU_DEPARTURES) {
        Some(d) => Answer::Departs(d),
        None => {
            let rows = diff
                .rows
                .into_iter()
                .filter(|row| !QEMU_DEPARTURES.iter().any(|d| (d.explains)(&seen, row)))
                .collect();
            Answer::Disagrees(Diff { sides: diff.sides, rows })
        }
    }
}

/// Asks `reference` about a case KVM could not decide (`why`), against the software CPU's
/// `interp` outcome: agreement decides the case; anything else leaves it undecided, with the
/// reference's answer first (summaries group by the first line).
pub fn ask(reference: &dyn Reference, case: &Case, interp: &Outcome, why: String) -> Verdict {
    if !reference.asks() {
        // No third opinion was asked for: the reason KVM could not decide is the whole story.
        return Verdict::Undecided { why };
    }
    let name = reference.name();
    let answer = match reference.run(case) {
        Ok(r) => judge(case, (name, &r), ("interp", interp)),
        Err(e) => Answer::NoAnswer(e),
    };
    match &answer {
        Answer::Agrees => Verdict::Agree,
        Answer::Disagrees(d) => {
            Verdict::Undecided { why: format!("{}; {why}\n{d}", answer.line(name, "the interpreter")) }
        }
        _ => Verdict::Undecided { why: format!("{}; {why}", answer.line(name, "the interpreter")) },
    }
}

/// For a divergence of KVM and the software CPU: which side `reference` agrees with, in words.
pub fn third_opinion(reference: &dyn Reference, case: &Case, kvm: &Outcome, interp: &Outcome) -> String {
    let name = reference.name();
    let r = match reference.run(case) {
        Ok(r) => r,
        Err(e) => return format!("no third opinion: {e}"),
    };
    let with_interp = |o: &Outcome| {
        let mut o = o.clone();
        o.rflags_undefined = interp.rflags_undefined;
        o
    };
    let (k, i) =
        (judge(case, (name, &r), ("kvm", &with_interp(kvm))), judge(case, (name, &r), ("interp", interp)));
    let sides = |a: &Answer| matches!(a, Answer::Agrees | Answer::Departs(_));
    match (sides(&k), sides(&i)) {
        (true, false) => {
            format!("{name} agrees with kvm: the interpreter stands alone ({})", k.line(name, "kvm"))
        }
        (false, true) => {
            format!(
                "{name} agrees with the interpreter: kvm stands alone ({})",
                i.line(name, "the interpreter")
            )
        }
        _ => {
            let show = |a: &Answer| match a {
                Answer::Disagrees(d) => format!("\n{d}"),
                _ => String::new(),
            };
            format!("{name} agrees with neither side:{}{}", show(&k), show(&i))
        }
    }
}
