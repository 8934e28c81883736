//! What one run of a case produced, as typed values: built from a run's [`StopReason`] and
//! [`CpuState`](duet_core::CpuState), or parsed once from a case file, where it is readable text
//! (`"stop": "exception #GP error 0x0 at 0x8003"`, `"rsp": "0x7bf0"`). The judge compares and
//! decides on these values; only this module reads or writes the text.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use duet_core::layout::{exception_name, ExceptionReport};
use duet_core::{CannotRun, DebugEvent, InstructionInfo, Regs, StopReason};
use serde::{Deserialize, Serialize};

use super::case::{hex_bytes, parse_bytes, parse_hex};

/// Exception vectors the judge names (SDM Vol. 3A Table 6-1).
pub mod vector {
    /// Debug exception.
    pub const DB: u8 = 1;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Stack-segment fault.
    pub const SS: u8 = 12;
    /// Page fault.
    pub const PF: u8 = 14;
    /// General protection.
    pub const GP: u8 = 13;
    /// Alignment check.
    pub const AC: u8 = 17;
}

/// A segment register (or TR, LDTR) of an outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SegReg {
    /// ES.
    Es,
    /// CS.
    Cs,
    /// SS.
    Ss,
    /// DS.
    Ds,
    /// FS.
    Fs,
    /// GS.
    Gs,
    /// The task register.
    Tr,
    /// The LDT register.
    Ldtr,
}

impl SegReg {
    /// Every segment register, in [`duet_core::Sregs::segments`] order, then TR and LDTR.
    pub const ALL: [SegReg; 8] =
        [SegReg::Es, SegReg::Cs, SegReg::Ss, SegReg::Ds, SegReg::Fs, SegReg::Gs, SegReg::Tr, SegReg::Ldtr];

    /// Its name in outcomes.
    pub fn name(self) -> &'static str {
        match self {
            SegReg::Es => "es",
            SegReg::Cs => "cs",
            SegReg::Ss => "ss",
            SegReg::Ds => "ds",
            SegReg::Fs => "fs",
            SegReg::Gs => "gs",
            SegReg::Tr => "tr",
            SegReg::Ldtr => "ldtr",
        }
    }
}

/// A part of a segment register: the selector or a field of its hidden part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SegPart {
    /// The visible selector.
    Selector,
    /// The base address.
    Base,
    /// The limit.
    Limit,
    /// The attributes (type, S, DPL, P, AVL, L, D/B, G) in VMX layout.
    Attributes,
}

impl SegPart {
    const ALL: [SegPart; 4] = [SegPart::Selector, SegPart::Base, SegPart::Limit, SegPart::Attributes];

    fn name(self) -> &'static str {
        match self {
            SegPart::Selector => "selector",
            SegPart::Base => "base",
            SegPart::Limit => "limit",
            SegPart::Attributes => "attributes",
        }
    }
}

/// A descriptor-table register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableReg {
    /// GDTR.
    Gdtr,
    /// IDTR.
    Idtr,
}

impl TableReg {
    fn name(self) -> &'static str {
        match self {
            TableReg::Gdtr => "gdtr",
            TableReg::Idtr => "idtr",
        }
    }
}

/// One register-like field of an outcome's final state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// A general-purpose register by encoding number (0 = RAX … 15 = R15; always below 16).
    Gpr(u8),
    /// RIP.
    Rip,
    /// RFLAGS.
    Rflags,
    /// A segment register's selector or hidden part.
    Seg(SegReg, SegPart),
    /// A descriptor-table register's base (`true`) or limit (`false`).
    Table(TableReg, bool),
    /// A control register (0, 2, 3, 4 or 8).
    Cr(u8),
    /// IA32_EFER.
    Efer,
    /// A model-specific register by index.
    Msr(u32),
}

impl Field {
    /// RSP.
    pub const RSP: Field = Field::Gpr(4);
    /// CR0.
    pub const CR0: Field = Field::Cr(0);
    /// The control registers an outcome holds.
    pub const CRS: [u8; 5] = [0, 2, 3, 4, 8];

    /// The kind of field, for divergence signatures (`rax`, `cs`, `gdtr`, `msr`, `cr0`).
    pub fn class(self) -> String {
        match self {
            Field::Seg(s, _) => s.name().into(),
            Field::Table(t, _) => t.name().into(),
            Field::Msr(_) => "msr".into(),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Field::Gpr(i) => f.write_str(Regs::GPR_NAMES.get(usize::from(i)).copied().unwrap_or("r?")),
            Field::Rip => f.write_str("rip"),
            Field::Rflags => f.write_str("rflags"),
            Field::Seg(s, p) => write!(f, "{}.{}", s.name(), p.name()),
            Field::Table(t, base) => write!(f, "{}.{}", t.name(), if base { "base" } else { "limit" }),
            Field::Cr(n) => write!(f, "cr{n}"),
            Field::Efer => f.write_str("efer"),
            Field::Msr(i) => write!(f, "msr[{i:#x}]"),
        }
    }
}

impl FromStr for Field {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(i) = Regs::GPR_NAMES.iter().position(|n| *n == s) {
            return Ok(Field::Gpr(i as u8));
        }
        let field = match s {
            "rip" => Some(Field::Rip),
            "rflags" => Some(Field::Rflags),
            "efer" => Some(Field::Efer),
            "gdtr.base" => Some(Field::Table(TableReg::Gdtr, true)),
            "gdtr.limit" => Some(Field::Table(TableReg::Gdtr, false)),
            "idtr.base" => Some(Field::Table(TableReg::Idtr, true)),
            "idtr.limit" => Some(Field::Table(TableReg::Idtr, false)),
            _ => None,
        };
        let cr =
            || s.strip_prefix("cr")?.parse::<u8>().ok().filter(|n| Field::CRS.contains(n)).map(Field::Cr);
        let msr = || {
            let index = parse_hex(s.strip_prefix("msr[")?.strip_suffix(']')?)?;
            u32::try_from(index).ok().map(Field::Msr)
        };
        let seg = || {
            let (reg, part) = s.split_once('.')?;
            let reg = SegReg::ALL.into_iter().find(|r| r.name() == reg)?;
            let part = SegPart::ALL.into_iter().find(|p| p.name() == part)?;
            Some(Field::Seg(reg, part))
        };
        field.or_else(cr).or_else(msr).or_else(seg).ok_or_else(|| format!("`{s}` is not a register"))
    }
}

/// Whether a port or MMIO access read or wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitKind {
    /// IN (or INS).
    In,
    /// OUT (or OUTS).
    Out,
    /// A read of an address above RAM.
    MmioRead,
    /// A write to an address above RAM.
    MmioWrite,
}

impl ExitKind {
    const ALL: [ExitKind; 4] = [ExitKind::In, ExitKind::Out, ExitKind::MmioRead, ExitKind::MmioWrite];

    fn name(self) -> &'static str {
        match self {
            ExitKind::In => "in",
            ExitKind::Out => "out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
        }
    }
}

/// One port or MMIO access, as the run loop saw it (`out 0xf4 1 2a`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Exit {
    /// Read or write, port or memory.
    pub kind: ExitKind,
    /// The port or physical address.
    pub addr: u64,
    /// The bytes read or written.
    pub data: Vec<u8>,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:#x} {} {}", self.kind.name(), self.addr, self.data.len(), hex_bytes(&self.data))
    }
}

impl FromStr for Exit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not an exit (`in|out|mmio-read|mmio-write ADDR SIZE HEX`)");
        let w: Vec<&str> = s.split_whitespace().collect();
        let [kind, addr, size, data] = w[..] else { return Err(bad()) };
        let kind = ExitKind::ALL.into_iter().find(|k| k.name() == kind).ok_or_else(bad)?;
        let addr = parse_hex(addr).ok_or_else(bad)?;
        let data = parse_bytes(data).ok_or_else(bad)?;
        if size.parse::<usize>().ok() != Some(data.len()) {
            return Err(format!("`{s}`: the size is not the number of bytes"));
        }
        Ok(Exit { kind, addr, data })
    }
}

/// How a stop reads in an outcome (stable text, comparable between backends).
pub fn stop_text(stop: &StopReason) -> String {
    match stop {
        StopReason::DebugExit { value } => format!("debug-exit {value:#x}"),
        StopReason::Exception(r) => {
            format!("exception {} error {:#x} at {:#x}", r.name(), r.error_code, r.rip)
        }
        StopReason::Halted => "halted".into(),
        StopReason::Shutdown => "shutdown".into(),
        StopReason::Debug(DebugEvent::SingleStep { rip }) => format!("debug single-step at {rip:#x}"),
        StopReason::Debug(DebugEvent::Breakpoint { rip }) => format!("debug breakpoint at {rip:#x}"),
        StopReason::Deadline => "deadline".into(),
        StopReason::Unsupported(i) => format!("unsupported {i}"),
        StopReason::CannotRun(c) => format!("cannot-run {c}"),
        StopReason::UnbackedFetch { addr } => format!("unbacked-fetch {addr:#x}"),
    }
}

/// Reads [`stop_text`] back. A software CPU's `unsupported` or `unbacked-fetch` and KVM's
/// `cannot-run` say that a backend could not run the case: they are not results, and a case file
/// cannot expect them.
pub fn parse_stop(s: &str) -> Result<StopReason, String> {
    let exception = |rest: &str| {
        let (rest, rip) = rest.rsplit_once(" at ")?;
        let (name, error) = rest.rsplit_once(" error ")?;
        let vector = (0..=255u8).find(|&v| exception_name(v) == name)?;
        Some(ExceptionReport { vector, error_code: parse_hex(error)?, rip: parse_hex(rip)? })
    };
    let rip_of = |rest: &str, prefix: &str| rest.strip_prefix(prefix).and_then(parse_hex);
    let stop = match s.split_once(' ').unwrap_or((s, "")) {
        ("halted", "") => Some(StopReason::Halted),
        ("shutdown", "") => Some(StopReason::Shutdown),
        ("deadline", "") => Some(StopReason::Deadline),
        ("debug-exit", v) => {
            parse_hex(v).and_then(|v| u32::try_from(v).ok()).map(|value| StopReason::DebugExit { value })
        }
        ("exception", rest) => exception(rest).map(StopReason::Exception),
        ("debug", rest) => rip_of(rest, "single-step at ")
            .map(|rip| DebugEvent::SingleStep { rip })
            .or_else(|| rip_of(rest, "breakpoint at ").map(|rip| DebugEvent::Breakpoint { rip }))
            .map(StopReason::Debug),
        ("unsupported" | "cannot-run" | "unbacked-fetch", _) => {
            return Err(format!("is `{s}`: a backend that could not run the case, not a result"))
        }
        _ => None,
    };
    stop.ok_or_else(|| {
        format!(
            "is `{s}`, not a stop (`debug-exit V`, `exception #XX error E at RIP`, `halted`, `shutdown`, \
             `deadline` or `debug single-step at RIP`)"
        )
    })
}

/// What one run of a case produced, in comparable form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "OutcomeFile", into = "OutcomeFile")]
pub struct Outcome {
    /// How the run ended.
    pub stop: StopReason,
    /// Final registers and system registers (a segment's hidden part is absent where it is not
    /// architecturally visible; an MSR is absent where the backend cannot read it).
    pub state: BTreeMap<Field, u64>,
    /// RFLAGS bits architecturally undefined at the end, masked in comparisons.
    pub rflags_undefined: u64,
    /// 8-byte words of RAM that differ from the initial image: address → value.
    pub memory: BTreeMap<u64, u64>,
    /// Port and MMIO accesses in order.
    pub exits: Vec<Exit>,
}

impl Outcome {
    /// An outcome with only a stop (the rest empty), for building one by hand.
    pub fn stopped(stop: StopReason) -> Outcome {
        Outcome {
            stop,
            state: BTreeMap::new(),
            rflags_undefined: 0,
            memory: BTreeMap::new(),
            exits: Vec::new(),
        }
    }

    /// The value of `f`, or 0 where the outcome has none.
    pub fn reg(&self, f: Field) -> u64 {
        self.state.get(&f).copied().unwrap_or(0)
    }

    /// The exception the run stopped with, if it did.
    pub fn exception(&self) -> Option<&ExceptionReport> {
        match &self.stop {
            StopReason::Exception(r) => Some(r),
            _ => None,
        }
    }

    /// Whether the run stopped with exception `vector`.
    pub fn raised(&self, vector: u8) -> bool {
        self.exception().is_some_and(|r| r.vector == vector)
    }

    /// Whether the run ended in a triple fault.
    pub fn shut_down(&self) -> bool {
        self.stop == StopReason::Shutdown
    }
}

/// A field of a case file that does not parse: its path within the outcome and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field (`stop`, `state.rsp`, `memory.0x7bf0`, `exits[2]`).
    pub field: String,
    /// What is wrong with it.
    pub why: String,
}

impl FieldError {
    /// The same error one level down (`outcome` + `stop` → `outcome.stop`).
    pub fn within(self, parent: &str) -> FieldError {
        FieldError { field: format!("{parent}.{}", self.field), why: self.why }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}` {}", self.field, self.why)
    }
}

/// [`Outcome`] as a case file spells it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct OutcomeFile {
    stop: String,
    state: BTreeMap<String, String>,
    #[serde(default = "zero_hex")]
    rflags_undefined: String,
    #[serde(default)]
    memory: BTreeMap<String, String>,
    #[serde(default)]
    exits: Vec<String>,
}

fn zero_hex() -> String {
    "0x0".into()
}

impl TryFrom<OutcomeFile> for Outcome {
    type Error = FieldError;
    fn try_from(f: OutcomeFile) -> Result<Self, FieldError> {
        let bad = |field: String, why: String| FieldError { field, why };
        let stop = parse_stop(&f.stop).map_err(|why| bad("stop".into(), why))?;
        let mut state = BTreeMap::new();
        for (k, v) in &f.state {
            let field = k.parse::<Field>().map_err(|why| bad(format!("state.{k}"), why))?;
            let v = parse_hex(v).ok_or_else(|| bad(format!("state.{k}"), "is not a hex number".into()))?;
            state.insert(field, v);
        }
        let rflags_undefined = parse_hex(&f.rflags_undefined)
            .ok_or_else(|| bad("rflags_undefined".into(), "is not a hex number".into()))?;
        let mut memory = BTreeMap::new();
        for (k, v) in &f.memory {
            let (Some(a), Some(v)) = (parse_hex(k), parse_hex(v)) else {
                return Err(bad(format!("memory.{k}"), "address and value must be hex".into()));
            };
            // The words are RAM a run changed: an 8-byte-aligned address inside the case's RAM.
            let ram = super::layout::RAM_SIZE;
            if a % 8 != 0 || a >= ram {
                let why = format!("is not an 8-byte-aligned address of the case's RAM (below {ram:#x})");
                return Err(bad(format!("memory.{k}"), why));
            }
            memory.insert(a, v);
        }
        let exits = f
            .exits
            .iter()
            .enumerate()
            .map(|(i, e)| e.parse().map_err(|why| bad(format!("exits[{i}]"), why)))
            .collect::<Result<_, _>>()?;
        Ok(Outcome { stop, state, rflags_undefined, memory, exits })
    }
}

impl From<Outcome> for OutcomeFile {
    fn from(o: Outcome) -> Self {
        OutcomeFile {
            stop: stop_text(&o.stop),
            state: o.state.iter().map(|(k, v)| (k.to_string(), format!("{v:#x}"))).collect(),
            rflags_undefined: format!("{:#x}", o.rflags_undefined),
            memory: o.memory.iter().map(|(a, v)| (format!("{a:#07x}"), format!("{v:#018x}"))).collect(),
            exits: o.exits.iter().map(Exit::to_string).collect(),
        }
    }
}

/// Why a [`StopReason::Unsupported`] or [`StopReason::CannotRun`] stop happened, shortened for
/// grouping (the instruction's mnemonic, without its addresses).
pub fn short_instruction(i: &InstructionInfo) -> String {
    i.mnemonic.split(" 0x").next().unwrap_or(&i.mnemonic).to_string()
}

/// What KVM could not run, in words: the instruction's first word and the reason's first clause.
pub fn cannot_run_text(c: &CannotRun) -> (String, String) {
    let what = c
        .instruction
        .as_ref()
        .map_or("?".to_string(), |i| i.mnemonic.split_whitespace().next().unwrap_or("?").to_string());
    let reason = c.reason.split(" (").next().unwrap_or(&c.reason).to_string();
    (what, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_as_written() {
        let mut all: Vec<Field> = (0..16).map(Field::Gpr).collect();
        all.extend([Field::Rip, Field::Rflags, Field::Efer, Field::Msr(0xc000_0102)]);
        all.extend(Field::CRS.map(Field::Cr));
        for s in SegReg::ALL {
            all.extend(SegPart::ALL.map(|p| Field::Seg(s, p)));
        }
        for t in [TableReg::Gdtr, TableReg::Idtr] {
            all.extend([Field::Table(t, true), Field::Table(t, false)]);
        }
        for f in all {
            assert_eq!(f.to_string().parse(), Ok(f), "{f}");
        }
        assert_eq!(Field::RSP.to_string(), "rsp");
        assert_eq!("msr[0x174]".parse(), Ok(Field::Msr(0x174)));
        for bad in ["cr1", "xmm0", "cs.lmit", "msr[zz]", "msr[0x100000000]", ""] {
            assert!(bad.parse::<Field>().is_err(), "{bad}");
        }
    }

    #[test]
    fn stops_read_back_as_written_and_non_results_are_refused() {
        let stops = [
            StopReason::DebugExit { value: 0x2a },
            StopReason::Exception(ExceptionReport { vector: vector::GP, error_code: 0x18, rip: 0x8003 }),
            StopReason::Exception(ExceptionReport { vector: 0x80, error_code: 0, rip: 0x8000 }),
            StopReason::Halted,
            StopReason::Shutdown,
            StopReason::Deadline,
            StopReason::Debug(DebugEvent::SingleStep { rip: 0x8002 }),
            StopReason::Debug(DebugEvent::Breakpoint { rip: 0x8004 }),
        ];
        for s in &stops {
            assert_eq!(parse_stop(&stop_text(s)), Ok(s.clone()), "{}", stop_text(s));
        }
        assert_eq!(stop_text(&stops[1]), "exception #GP error 0x18 at 0x8003");
        assert!(parse_stop("exploded").unwrap_err().contains("`exploded`, not a stop"));
        assert!(parse_stop("exception #XY error 0x0 at 0x1").is_err());
        assert!(parse_stop("debug-exit 0x100000000").is_err());
        let cannot =
            StopReason::CannotRun(CannotRun { instruction: None, reason: "emulation failure".into() });
        assert!(parse_stop(&stop_text(&cannot)).unwrap_err().contains("not a result"));
    }

    #[test]
    fn exits_read_back_as_written() {
        let e = Exit { kind: ExitKind::MmioRead, addr: 0xd000_0000, data: vec![0xff; 4] };
        assert_eq!(e.to_string(), "mmio-read 0xd0000000 4 ffffffff");
        assert_eq!(e.to_string().parse(), Ok(e));
        assert!("out 0xf4 2 2a".parse::<Exit>().is_err(), "size and bytes disagree");
        assert!("poke 0xf4 1 2a".parse::<Exit>().is_err());
    }

    #[test]
    fn memory_words_outside_the_case_ram_are_refused_at_load() {
        let file = |addr: &str| {
            let json = format!(r#"{{"stop":"halted","state":{{}},"memory":{{"{addr}":"0x1"}}}}"#);
            serde_json::from_str::<Outcome>(&json).map_err(|e| e.to_string())
        };
        assert!(file("0x7fff8").is_ok());
        for bad in ["0xfffffffffffffffc", "0x80000", "0x7fffc"] {
            let e = file(bad).expect_err(bad);
            assert!(e.contains(&format!("memory.{bad}")) && e.contains("8-byte-aligned"), "{e}");
        }
    }
}
