//! Three opinions side by side: KVM, the software CPU and the QEMU reference.
//!
//! For every field where the runs differ, the table shows each side's value and, when two
//! agree, names the side that stands alone: a likely bug of that CPU (or a known host defect).

use std::collections::BTreeMap;
use std::fmt;

use duet_core::diff::clip;

use crate::run::{compare_at_most, RunReport};

/// One differing field with every side's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpinionRow {
    /// Field name (`rax`, `stop`, `mem[0x1000]`).
    pub field: String,
    /// The value on each side, in the order of [`Opinions::sides`].
    pub values: Vec<String>,
    /// The side whose value differs from the two others that agree, if any.
    pub alone: Option<String>,
}

/// The differences between several runs of one guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Opinions {
    /// The sides, e.g. `["kvm", "interp", "qemu"]`.
    pub sides: Vec<String>,
    /// Differing fields, in the order they were first found.
    pub rows: Vec<OpinionRow>,
    /// Differing memory words left out of `rows` (most of any one pair of sides).
    pub omitted: u64,
}

impl Opinions {
    /// Compares every pair of `reports` and merges the differences into one row per field.
    pub fn of(reports: &[RunReport]) -> Self {
        Opinions::at_most(reports, usize::MAX)
    }

    /// [`Opinions::of`], keeping at most `max_rows` rows of each pair's comparison.
    pub fn at_most(reports: &[RunReport], max_rows: usize) -> Self {
        let mut omitted = 0;
        let sides: Vec<String> = reports.iter().map(|r| r.outcome.backend.to_string()).collect();
        let mut values: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
        let mut order = Vec::new();
        for i in 0..reports.len() {
            for j in i + 1..reports.len() {
                let (diff, left_out) = compare_at_most(&reports[i], &reports[j], max_rows);
                omitted = omitted.max(left_out);
                for row in diff.rows {
                    let entry = values.entry(row.field.clone()).or_insert_with(|| {
                        order.push(row.field.clone());
                        vec![None; reports.len()]
                    });
                    entry[i] = Some(row.left);
                    entry[j] = Some(row.right);
                }
            }
        }
        let rows = order
            .into_iter()
            .map(|field| {
                let v = values.remove(&field).unwrap_or_default();
                // A side absent from every differing pair agrees with all the others; its value
                // is then any other side's (they are all equal to it).
                let known = v.iter().flatten().next().cloned().unwrap_or_default();
                let values: Vec<String> = v.into_iter().map(|x| x.unwrap_or_else(|| known.clone())).collect();
                let alone = (values.len() == 3)
                    .then(|| {
                        (0..3).find(|&k| {
                            let others: Vec<&String> =
                                values.iter().enumerate().filter(|(i, _)| *i != k).map(|(_, s)| s).collect();
                            others[0] == others[1] && *others[0] != values[k]
                        })
                    })
                    .flatten()
                    .map(|k| sides[k].clone());
                OpinionRow { field, values, alone }
            })
            .collect();
        Opinions { sides, rows, omitted }
    }

    /// True when every run ended in the same state.
    pub fn agree(&self) -> bool {
        self.rows.is_empty()
    }
}

impl fmt::Display for Opinions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rows.is_empty() {
            return writeln!(f, "no difference between {}", self.sides.join(", "));
        }
        let rows: Vec<(String, Vec<String>, &str)> = self
            .rows
            .iter()
            .map(|r| {
                (
                    r.field.clone(),
                    r.values.iter().map(|v| clip(v)).collect(),
                    r.alone.as_deref().unwrap_or("-"),
                )
            })
            .collect();
        let mut widths: Vec<usize> = vec![rows.iter().map(|r| r.0.len()).max().unwrap_or(5).max(5)];
        for (k, side) in self.sides.iter().enumerate() {
            widths.push(rows.iter().map(|r| r.1[k].chars().count()).max().unwrap_or(0).max(side.len()));
        }
        write!(f, "{:<w$}", "field", w = widths[0])?;
        for (k, side) in self.sides.iter().enumerate() {
            write!(f, "  {:>w$}", side, w = widths[k + 1])?;
        }
        writeln!(f, "  stands alone")?;
        for (field, values, alone) in &rows {
            write!(f, "{:<w$}", field, w = widths[0])?;
            for (k, v) in values.iter().enumerate() {
                write!(f, "  {:>w$}", v, w = widths[k + 1])?;
            }
            writeln!(f, "  {alone}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use duet_core::vm_memory::GuestAddress;
    use duet_core::{CpuState, GuestMemory, RunOutcome, StopReason};

    use super::*;

    fn report(backend: &'static str, rax: u64, rbx: u64) -> RunReport {
        let mut state = CpuState::reset();
        state.regs.rax = rax;
        state.regs.rbx = rbx;
        let memory = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap());
        RunReport {
            outcome: RunOutcome {
                backend,
                stop: StopReason::Halted,
                state,
                exits: 0,
                instructions: None,
                wall: Duration::ZERO,
                undefined_rflags: 0,
            },
            console: Vec::new(),
            console_digest: duet_devices::ConsoleDigest::of(b""),
            post_code: None,
            memory,
            ram_size: 0x1000,
        }
    }

    #[test]
    fn the_side_that_differs_from_two_agreeing_ones_stands_alone() {
        let o = Opinions::of(&[report("kvm", 1, 7), report("interp", 2, 7), report("qemu", 2, 7)]);
        assert_eq!(
            o.rows,
            vec![OpinionRow {
                field: "rax".into(),
                values: vec!["0x1".into(), "0x2".into(), "0x2".into()],
                alone: Some("kvm".into())
            }]
        );
        let table = o.to_string();
        assert!(table.lines().nth(1).is_some_and(|l| l.starts_with("rax") && l.ends_with("kvm")), "{table}");
    }

    #[test]
    fn three_different_values_have_no_lone_side_and_equal_runs_agree() {
        let o = Opinions::of(&[report("kvm", 1, 0), report("interp", 2, 0), report("qemu", 3, 0)]);
        assert_eq!(o.rows.len(), 1);
        assert_eq!(o.rows[0].alone, None);
        let same = Opinions::of(&[report("kvm", 1, 0), report("interp", 1, 0), report("qemu", 1, 0)]);
        assert!(same.agree());
        assert_eq!(same.to_string(), "no difference between kvm, interp, qemu\n");
    }
}
