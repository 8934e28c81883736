//! The exit statuses of `duet`: one per outcome, so a script can tell them apart.
//!
//! A guest's debug-exit write of v ends the process with (v << 1) | 1, as QEMU's isa-debug-exit
//! does: always odd. Every outcome of duet's own is therefore a distinct even number.

use std::process::ExitCode;

use duet::{CpuState, StopReason};

/// An outcome of `duet` with an exit status of its own (see [`TABLE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The guest halted with interrupts disabled (its normal end), or no divergence was found.
    Halted,
    /// `--backend both`/`all` found a difference; `duet fuzz`/`duet diff` found a divergence.
    Difference,
    /// duet's own error: bad arguments, an unreadable or oversized input, a backend failure.
    Error,
    /// A fixture IDT stub reported an exception.
    Exception,
    /// The guest shut down (triple fault).
    Shutdown,
    /// The deadline (`--timeout`) passed first.
    Deadline,
    /// The software CPU met an instruction it does not implement.
    Unsupported,
    /// KVM could not run the guest (e.g. an emulation failure of a nested KVM).
    CannotRun,
    /// SIGINT or SIGTERM stopped the command before it finished.
    Interrupted,
    /// The guest fetched an instruction from an address no RAM backs.
    UnbackedFetch,
    /// The guest halted with interrupts enabled and nothing that could ever interrupt it.
    Waiting,
    /// Neither run produced a result that can be compared (`--backend both`/`all`).
    NoComparison,
    /// A debug event (single step or breakpoint) ended the run.
    DebugEvent,
}

/// Every status with its number and meaning, in the order `--help` lists them.
pub const TABLE: [(Status, u8, &str); 13] = [
    (Status::Halted, 0, "the guest halted (`fuzz`, `diff`: no divergence)"),
    (Status::Difference, 2, "the runs differ (`fuzz`, `diff`: a divergence)"),
    (Status::Error, 4, "duet's own error (bad argument, unreadable or oversized input)"),
    (Status::Exception, 6, "an exception reported by the fixture IDT stubs"),
    (Status::Shutdown, 8, "shutdown (triple fault)"),
    (Status::Deadline, 10, "the deadline (--timeout) passed"),
    (Status::Unsupported, 12, "an instruction the software CPU does not implement"),
    (Status::CannotRun, 14, "KVM cannot run the guest"),
    (Status::Interrupted, 16, "interrupted by SIGINT/SIGTERM"),
    (Status::UnbackedFetch, 18, "instruction fetch from an address no RAM backs"),
    (Status::Waiting, 20, "halted with interrupts enabled and no interrupt source"),
    (Status::NoComparison, 22, "no run produced a result that can be compared"),
    (Status::DebugEvent, 24, "a single-step or breakpoint event"),
];

impl Status {
    /// The number the process exits with.
    pub fn code(self) -> u8 {
        TABLE.iter().find(|(s, _, _)| *s == self).map_or(4, |&(_, n, _)| n)
    }

    /// The outcome a run ended in, judged from its stop and final state.
    pub fn of_stop(stop: &StopReason, state: &CpuState) -> Status {
        match stop {
            StopReason::DebugExit { .. } => Status::Halted,
            StopReason::Halted if duet::run::waits_forever(stop, state) => Status::Waiting,
            StopReason::Halted => Status::Halted,
            StopReason::Exception(_) => Status::Exception,
            StopReason::Shutdown => Status::Shutdown,
            StopReason::Debug(_) => Status::DebugEvent,
            StopReason::Deadline => Status::Deadline,
            StopReason::Unsupported(_) => Status::Unsupported,
            StopReason::CannotRun(_) => Status::CannotRun,
            StopReason::UnbackedFetch { .. } => Status::UnbackedFetch,
        }
    }
}

impl From<Status> for ExitCode {
    fn from(s: Status) -> ExitCode {
        ExitCode::from(s.code())
    }
}

/// The exit status of one run: the guest's debug-exit status, else its outcome's.
pub fn of_run(stop: &StopReason, state: &CpuState) -> u8 {
    match stop.debug_exit_status() {
        Some(code) => code,
        None => Status::of_stop(stop, state).code(),
    }
}

/// The status table as `--help` prints it.
pub fn help_table() -> String {
    let mut s = String::from(
        "Exit status: a guest's write of v to port 0xF4 exits with (v << 1) | 1, an odd number; as in QEMU\n\
         only its low 8 bits reach the shell, so values above 0x7F wrap (0x80 exits with 1).\n\
         duet's own outcomes are even:\n",
    );
    for (_, n, what) in TABLE {
        s += &format!("  {n:>3}  {what}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_a_distinct_even_status() {
        let mut seen = std::collections::BTreeSet::new();
        for (s, n, _) in TABLE {
            assert_eq!(n % 2, 0, "{s:?}");
            assert!(seen.insert(n), "{s:?} reuses {n}");
            assert_eq!(s.code(), n);
        }
    }

    #[test]
    fn readme_tables_every_status() {
        let readme = include_str!("../../../README.md");
        for (s, n, _) in TABLE {
            assert!(
                readme.contains(&format!("\n| {n} | ")),
                "README.md's exit-status table lacks {n} ({s:?})"
            );
        }
    }

    #[test]
    fn debug_exit_statuses_are_odd_and_wrap_at_eight_bits() {
        let st = CpuState::reset();
        // QEMU isa-debug-exit: exit((v << 1) | 1); the shell sees the low 8 bits.
        assert_eq!(of_run(&StopReason::DebugExit { value: 0 }, &st), 1);
        assert_eq!(of_run(&StopReason::DebugExit { value: 0x7f }, &st), 0xff);
        assert_eq!(of_run(&StopReason::DebugExit { value: 0x80 }, &st), 1);
        assert_eq!(of_run(&StopReason::Shutdown, &st), 8);
    }
}
