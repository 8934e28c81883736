//! [`StateDiff`]: the differences between two final CPU states and memories, as a table.

use std::fmt;

use vm_memory::{Bytes, GuestAddress};

use crate::state::{CpuState, Segment};
use crate::GuestMemory;

/// What a comparison ignores: only what the architecture leaves undefined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffMask {
    /// RFLAGS bits whose value is architecturally undefined at this point (from iced-x86).
    pub rflags_undefined: u64,
    /// Ignore the x87/SSE area (for guests that never touch it on backends that do not model it).
    pub ignore_fpu: bool,
}

/// One differing field: its name and the value on each side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffRow {
    /// Field name (`rax`, `cs.base`, `mem[0x1000]`).
    pub field: String,
    /// Value on the left side.
    pub left: String,
    /// Value on the right side.
    pub right: String,
}

/// The differences between two runs' final states.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDiff {
    /// Names of the two sides (e.g. "kvm", "interp").
    pub sides: (String, String),
    /// Differing fields, registers first, then memory.
    pub rows: Vec<DiffRow>,
}

/// Bytes of each memory read at a time when two memories are compared.
pub const MEMORY_CHUNK: usize = 64 << 10;

/// Widest value shown in a table cell; longer ones (console text, stop reasons, printed in
/// full elsewhere) are cut with an ellipsis.
pub const CELL_WIDTH: usize = 36;

/// `s` cut to [`CELL_WIDTH`] characters.
pub fn clip(s: &str) -> String {
    if s.chars().count() <= CELL_WIDTH {
        s.to_string()
    } else {
        let cut: String = s.chars().take(CELL_WIDTH - 1).collect();
        format!("{cut}…")
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

impl StateDiff {
    /// Compares two CPU states, masking what `mask` says is undefined.
    pub fn states(left: (&str, &CpuState), right: (&str, &CpuState), mask: &DiffMask) -> Self {
        let mut d = StateDiff { sides: (left.0.into(), right.0.into()), rows: Vec::new() };
        let (a, b) = (left.1, right.1);
        let names = crate::state::Regs::GPR_NAMES;
        for ((name, x), y) in names.iter().zip(a.regs.gprs()).zip(b.regs.gprs()) {
            d.cmp(name, x, y);
        }
        d.cmp("rip", a.regs.rip, b.regs.rip);
        let m = !mask.rflags_undefined;
        d.cmp("rflags", a.regs.rflags & m, b.regs.rflags & m);
        for ((name, x), (_, y)) in a.sregs.segments().iter().zip(b.sregs.segments()) {
            d.segment(name, x, y);
        }
        d.segment("tr", &a.sregs.tr, &b.sregs.tr);
        d.segment("ldtr", &a.sregs.ldt, &b.sregs.ldt);
        let (sa, sb) = (&a.sregs, &b.sregs);
        d.cmp("gdtr.base", sa.gdt.base, sb.gdt.base);
        d.cmp("gdtr.limit", sa.gdt.limit.into(), sb.gdt.limit.into());
        d.cmp("idtr.base", sa.idt.base, sb.idt.base);
        d.cmp("idtr.limit", sa.idt.limit.into(), sb.idt.limit.into());
        for (n, x, y) in [
            ("cr0", sa.cr0, sb.cr0),
            ("cr2", sa.cr2, sb.cr2),
            ("cr3", sa.cr3, sb.cr3),
            ("cr4", sa.cr4, sb.cr4),
            ("cr8", sa.cr8, sb.cr8),
            ("efer", sa.efer, sb.efer),
        ] {
            d.cmp(n, x, y);
        }
        if !mask.ignore_fpu && a.fpu != b.fpu {
            for (i, (x, y)) in a.fpu.0.chunks(8).zip(b.fpu.0.chunks(8)).enumerate() {
                let word = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
                d.cmp(&format!("fxsave[{:#x}]", i * 8), word(x), word(y));
            }
        }
        let keys: std::collections::BTreeSet<u32> = a.msrs.keys().chain(b.msrs.keys()).copied().collect();
        for k in keys {
            let show = |v: Option<&u64>| v.map_or_else(|| "absent".to_string(), |v| hex(*v));
            let (x, y) = (a.msrs.get(&k), b.msrs.get(&k));
            if x != y {
                d.rows.push(DiffRow { field: format!("msr[{k:#x}]"), left: show(x), right: show(y) });
            }
        }
        d
    }

    /// Adds the differing 8-byte words of `[start, start + len)` in two memories.
    pub fn memory(&mut self, left: &GuestMemory, right: &GuestMemory, start: u64, len: u64) {
        self.memory_at_most(left, right, start, len, usize::MAX);
    }

    /// Adds the differing 8-byte words of `[start, start + len)` in two memories while the
    /// table has fewer than `max_rows` rows, and returns how many more words differ.
    ///
    /// The memories are read [`MEMORY_CHUNK`] bytes at a time, so comparing gigabytes of RAM
    /// needs two small buffers, not two copies of it. A chunk readable on one side only is one
    /// row; a chunk readable on neither side has nothing to compare.
    pub fn memory_at_most(
        &mut self,
        left: &GuestMemory,
        right: &GuestMemory,
        start: u64,
        len: u64,
        max_rows: usize,
    ) -> u64 {
        let mut a = vec![0u8; MEMORY_CHUNK];
        let mut b = vec![0u8; MEMORY_CHUNK];
        let mut omitted = 0u64;
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(MEMORY_CHUNK as u64) as usize;
            let at = start.wrapping_add(off);
            off += n as u64;
            let (a, b) = (&mut a[..n], &mut b[..n]);
            let ra = left.read_slice(a, GuestAddress(at)).is_ok();
            let rb = right.read_slice(b, GuestAddress(at)).is_ok();
            if ra != rb {
                let ok = |r: bool| if r { "readable" } else { "unreadable" }.to_string();
                let row = DiffRow { field: format!("mem[{at:#x}..+{n:#x}]"), left: ok(ra), right: ok(rb) };
                omitted += self.push_at_most(row, max_rows);
                continue;
            }
            if !ra || a == b {
                continue;
            }
            for (i, (x, y)) in a.chunks(8).zip(b.chunks(8)).enumerate() {
                if x != y {
                    if self.rows.len() >= max_rows {
                        omitted += 1;
                        continue;
                    }
                    let show = |c: &[u8]| c.iter().rev().map(|b| format!("{b:02x}")).collect::<String>();
                    self.rows.push(DiffRow {
                        field: format!("mem[{:#x}]", at.wrapping_add(i as u64 * 8)),
                        left: show(x),
                        right: show(y),
                    });
                }
            }
        }
        omitted
    }

    /// Adds `row` when the table has room for it; returns 1 when it had not.
    fn push_at_most(&mut self, row: DiffRow, max_rows: usize) -> u64 {
        if self.rows.len() < max_rows {
            self.rows.push(row);
            0
        } else {
            1
        }
    }

    /// True when nothing differs.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn cmp(&mut self, field: &str, x: u64, y: u64) {
        if x != y {
            self.rows.push(DiffRow { field: field.into(), left: hex(x), right: hex(y) });
        }
    }

    fn segment(&mut self, name: &str, x: &Segment, y: &Segment) {
        self.cmp(&format!("{name}.selector"), x.selector.into(), y.selector.into());
        // Hidden parts of an unusable segment are not architecturally visible.
        if x.unusable && y.unusable {
            return;
        }
        self.cmp(&format!("{name}.base"), x.base, y.base);
        self.cmp(&format!("{name}.limit"), x.limit.into(), y.limit.into());
        self.cmp(&format!("{name}.attributes"), x.attributes().into(), y.attributes().into());
    }
}

/// Characters of `s` as [`clip`] shows it, without building the clipped string.
fn clipped_width(s: &str) -> usize {
    s.chars().count().min(CELL_WIDTH)
}

impl fmt::Display for StateDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rows.is_empty() {
            return writeln!(f, "no difference between {} and {}", self.sides.0, self.sides.1);
        }
        // Widths first, then one row at a time: a long table is never copied.
        let w0 = self.rows.iter().map(|r| r.field.len()).max().unwrap_or(0).max(5);
        let w1 = self.rows.iter().map(|r| clipped_width(&r.left)).max().unwrap_or(0).max(self.sides.0.len());
        let w2 = self.rows.iter().map(|r| clipped_width(&r.right)).max().unwrap_or(0).max(self.sides.1.len());
        writeln!(f, "{:<w0$}  {:>w1$}  {:>w2$}", "field", self.sides.0, self.sides.1)?;
        writeln!(f, "{}  {}  {}", "-".repeat(w0), "-".repeat(w1), "-".repeat(w2))?;
        for r in &self.rows {
            writeln!(f, "{:<w0$}  {:>w1$}  {:>w2$}", r.field, clip(&r.left), clip(&r.right))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::rflags;

    #[test]
    fn identical_states_have_no_rows() {
        let s = CpuState::reset();
        let d = StateDiff::states(("kvm", &s), ("interp", &s), &DiffMask::default());
        assert!(d.is_empty());
        assert_eq!(d.to_string(), "no difference between kvm and interp\n");
    }

    #[test]
    fn differences_are_listed_and_undefined_flags_masked() {
        let a = CpuState::reset();
        let mut b = a.clone();
        b.regs.rbx = 5;
        b.regs.rflags |= rflags::AF;
        b.sregs.ds.base = 0x10;
        let d = StateDiff::states(("kvm", &a), ("interp", &b), &DiffMask::default());
        let fields: Vec<&str> = d.rows.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(fields, ["rbx", "rflags", "ds.base"]);
        let table = d.to_string();
        assert!(table.contains("rbx") && table.contains("0x5"), "{table}");
        let masked = DiffMask { rflags_undefined: rflags::AF, ..DiffMask::default() };
        let d = StateDiff::states(("kvm", &a), ("interp", &b), &masked);
        assert_eq!(d.rows.len(), 2);
    }

    #[test]
    fn long_values_are_clipped_in_the_table_only() {
        let long = "x".repeat(100);
        let d = StateDiff {
            sides: ("a".into(), "b".into()),
            rows: vec![DiffRow { field: "console".into(), left: long.clone(), right: "y".into() }],
        };
        let table = d.to_string();
        assert!(table.contains(&format!("{}…", "x".repeat(CELL_WIDTH - 1))), "{table}");
        assert!(!table.contains(&long));
        assert_eq!(d.rows[0].left, long);
    }

    #[test]
    fn memory_differences_are_shown_per_word() {
        let m1 = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let m2 = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        m2.write_obj(0xabu8, GuestAddress(0x18)).unwrap();
        let mut d = StateDiff::default();
        d.memory(&m1, &m2, 0, 0x1000);
        assert_eq!(
            d.rows,
            vec![DiffRow {
                field: "mem[0x18]".into(),
                left: "0000000000000000".into(),
                right: "00000000000000ab".into()
            }]
        );
    }

    #[test]
    fn memory_is_compared_in_chunks_and_rows_beyond_the_limit_are_counted() {
        // Three chunks and a half: every word differs in the second chunk and the last half.
        let len = 3 * MEMORY_CHUNK as u64 + MEMORY_CHUNK as u64 / 2;
        let m1 = GuestMemory::from_ranges(&[(GuestAddress(0), len as usize)]).unwrap();
        let m2 = GuestMemory::from_ranges(&[(GuestAddress(0), len as usize)]).unwrap();
        let ones = vec![0xffu8; MEMORY_CHUNK];
        m2.write_slice(&ones, GuestAddress(MEMORY_CHUNK as u64)).unwrap();
        m2.write_slice(&ones[..MEMORY_CHUNK / 2], GuestAddress(3 * MEMORY_CHUNK as u64)).unwrap();
        let words = (MEMORY_CHUNK + MEMORY_CHUNK / 2) as u64 / 8;
        let mut all = StateDiff::default();
        all.memory(&m1, &m2, 0, len);
        assert_eq!(all.rows.len() as u64, words);
        let mut some = StateDiff::default();
        let omitted = some.memory_at_most(&m1, &m2, 0, len, 10);
        assert_eq!((some.rows.len(), omitted), (10, words - 10));
        assert_eq!(some.rows[..], all.rows[..10]);
        assert_eq!(some.rows[0].field, format!("mem[{:#x}]", MEMORY_CHUNK));
        assert_eq!(all.rows.last().map(|r| r.field.clone()), Some(format!("mem[{:#x}]", len - 8)));
    }

    #[test]
    fn memory_readable_on_one_side_only_is_one_row_per_chunk() {
        // Three chunks on the left, one on the right: the last two are one row each.
        let chunk = MEMORY_CHUNK as u64;
        let m1 = GuestMemory::from_ranges(&[(GuestAddress(0), 3 * MEMORY_CHUNK)]).unwrap();
        let m2 = GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY_CHUNK)]).unwrap();
        let mut d = StateDiff::default();
        d.memory(&m1, &m2, 0, 3 * chunk);
        let row = |at: u64| DiffRow {
            field: format!("mem[{at:#x}..+{chunk:#x}]"),
            left: "readable".into(),
            right: "unreadable".into(),
        };
        assert_eq!(d.rows, vec![row(chunk), row(2 * chunk)]);
    }
}
