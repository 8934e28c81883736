//! What differs between two outcomes, as typed rows: the judge and the host limits look at these
//! values; the table a person reads is made from them only for printing.

use std::fmt;

use duet_core::diff::DiffRow;
use duet_core::{StateDiff, StopReason};

use super::outcome::{stop_text, Exit, Field};

/// One difference between two outcomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    /// The runs ended differently.
    Stop {
        /// The left side's stop.
        left: StopReason,
        /// The right side's stop.
        right: StopReason,
    },
    /// A register differs (or one side lacks it).
    Register {
        /// The register.
        field: Field,
        /// The left side's value.
        left: Option<u64>,
        /// The right side's value.
        right: Option<u64>,
    },
    /// An 8-byte word of RAM differs.
    Memory {
        /// Its address.
        addr: u64,
        /// The left side's value.
        left: u64,
        /// The right side's value.
        right: u64,
    },
    /// The port and MMIO accesses part at this one (`None`: that side made no more).
    Exit {
        /// The number of the first access that differs.
        index: usize,
        /// The left side's access.
        left: Option<Exit>,
        /// The right side's access.
        right: Option<Exit>,
    },
}

impl Row {
    /// The kind of field, for divergence signatures (`stop`, `rflags`, `cs`, `mem`, `exit`).
    pub fn class(&self) -> String {
        match self {
            Row::Stop { .. } => "stop".into(),
            Row::Register { field, .. } => field.class(),
            Row::Memory { .. } => "mem".into(),
            Row::Exit { .. } => "exit".into(),
        }
    }

    /// The two values XORed, for a register or memory row where both sides have one.
    pub fn xor(&self) -> Option<u64> {
        match *self {
            Row::Register { left: Some(l), right: Some(r), .. } | Row::Memory { left: l, right: r, .. } => {
                Some(l ^ r)
            }
            _ => None,
        }
    }

    /// The row as printed: field name and the two values.
    fn printable(&self) -> DiffRow {
        let row = |field: String, left: String, right: String| DiffRow { field, left, right };
        match self {
            Row::Stop { left, right } => row("stop".into(), stop_text(left), stop_text(right)),
            Row::Register { field, left, right } => {
                let show = |v: &Option<u64>| v.map_or_else(|| "absent".to_string(), |v| format!("{v:#x}"));
                row(field.to_string(), show(left), show(right))
            }
            Row::Memory { addr, left, right } => {
                row(format!("mem[{addr:#x}]"), format!("{left:016x}"), format!("{right:016x}"))
            }
            Row::Exit { index, left, right } => {
                let show = |e: &Option<Exit>| {
                    e.as_ref().map_or_else(|| "(no more exits)".to_string(), Exit::to_string)
                };
                row(format!("exit #{index}"), show(left), show(right))
            }
        }
    }
}

/// The differences between two outcomes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Names of the two sides (e.g. "kvm", "interp").
    pub sides: (String, String),
    /// Differing fields: stop, registers, memory words, then the first differing exit.
    pub rows: Vec<Row>,
}

impl Diff {
    /// No difference.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table form (core's [`StateDiff`]) for printing.
    pub fn to_state_diff(&self) -> StateDiff {
        StateDiff { sides: self.sides.clone(), rows: self.rows.iter().map(Row::printable).collect() }
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_state_diff().fmt(f)
    }
}
