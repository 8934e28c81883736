//! Case files: a generated program with its start state and, once run, the hardware's result.
//!
//! A case is small readable JSON: the mode, the registers, the code bytes (with disassembly,
//! for the reader), the data bytes, and the expected outcome with where it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::FuzzError;

/// Version of the case-file format this build reads and writes.
pub const CASE_FORMAT: u32 = 1;

/// The mode (and privilege level) a case starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FuzzMode {
    /// Real mode, 16-bit code.
    Real,
    /// Protected mode, 16-bit code segment, ring 0.
    Prot16,
    /// Protected mode, 32-bit flat segments, ring 0.
    Prot32,
    /// Protected mode, 32-bit flat segments, ring 3.
    Prot32Ring3,
    /// Long mode, 64-bit code, ring 0.
    Long64,
    /// Long mode, 64-bit code, ring 3.
    Long64Ring3,
}

impl FuzzMode {
    /// Every mode, in the order `--mode all` runs them.
    pub const ALL: [FuzzMode; 6] = [
        FuzzMode::Real,
        FuzzMode::Prot16,
        FuzzMode::Prot32,
        FuzzMode::Prot32Ring3,
        FuzzMode::Long64,
        FuzzMode::Long64Ring3,
    ];

    /// Code size in bits.
    pub fn bitness(self) -> u32 {
        match self {
            FuzzMode::Real | FuzzMode::Prot16 => 16,
            FuzzMode::Prot32 | FuzzMode::Prot32Ring3 => 32,
            FuzzMode::Long64 | FuzzMode::Long64Ring3 => 64,
        }
    }

    /// The fixture mode whose tables (GDT, IDT, stubs, page tables) the case runs over.
    pub fn fixture_mode(self) -> duet_fixtures::Mode {
        match self {
            FuzzMode::Real => duet_fixtures::Mode::Real,
            FuzzMode::Prot16 | FuzzMode::Prot32 | FuzzMode::Prot32Ring3 => duet_fixtures::Mode::Protected,
            FuzzMode::Long64 | FuzzMode::Long64Ring3 => duet_fixtures::Mode::Long,
        }
    }

    /// Privilege level the code runs at.
    pub fn cpl(self) -> u8 {
        match self {
            FuzzMode::Prot32Ring3 | FuzzMode::Long64Ring3 => 3,
            _ => 0,
        }
    }

    /// The name used on the command line and in case files.
    pub fn name(self) -> &'static str {
        match self {
            FuzzMode::Real => "real",
            FuzzMode::Prot16 => "prot16",
            FuzzMode::Prot32 => "prot32",
            FuzzMode::Prot32Ring3 => "prot32-ring3",
            FuzzMode::Long64 => "long64",
            FuzzMode::Long64Ring3 => "long64-ring3",
        }
    }
}

impl fmt::Display for FuzzMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FuzzMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FuzzMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = FuzzMode::ALL.iter().map(|m| m.name()).collect();
            format!("unknown mode `{s}` (expected one of {})", names.join(", "))
        })
    }
}

/// A generated program and its start state: everything needed to run it identically anywhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    /// Case-file format version ([`CASE_FORMAT`]).
    pub format: u32,
    /// Mode and privilege level at the first instruction.
    pub mode: FuzzMode,
    /// Free text: where the case came from, the analysis of a divergence, the SDM section.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// GPRs by name (`rax` … `r15`) as hex; RSP too. Missing registers are zero.
    pub regs: BTreeMap<String, String>,
    /// RFLAGS at the first instruction, hex.
    pub rflags: String,
    /// Data-segment selectors (`ds`, `es`, `fs`, `gs`) as hex; in long mode also `fs.base`, `gs.base`.
    #[serde(default)]
    pub segments: BTreeMap<String, String>,
    /// The code bytes, hex, loaded at [`super::layout::CODE_ADDR`].
    pub code: String,
    /// Disassembly of `code`, for the reader (not read back).
    #[serde(default)]
    pub disasm: Vec<String>,
    /// The data bytes, hex, loaded at [`super::layout::DATA_ADDR`].
    pub data: String,
    /// The CPUID profile the case runs under (vendor and optional features); absent means this
    /// process's shared profile ([`crate::backends::shared_cpuid_profile`]), which is host-dependent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuid: Option<super::profile::CaseCpuid>,
    /// The result a correct CPU produces, and which opinion it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Expected>,
}

/// An expected outcome and its source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// `kvm` (recorded on hardware), `qemu` (the reference) or `sdm` (worked out by hand).
    pub source: String,
    /// The outcome.
    pub outcome: Outcome,
}

/// What one run of a case produced, in comparable, printable form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// How the run ended (`debug-exit 0x12`, `exception #GP …`, `shutdown`, …).
    pub stop: String,
    /// Final registers and system registers by name, hex.
    pub state: BTreeMap<String, String>,
    /// RFLAGS bits architecturally undefined at the end (hex), masked in comparisons.
    #[serde(default = "zero_hex")]
    pub rflags_undefined: String,
    /// 8-byte words of RAM that differ from the initial image: address → value (hex).
    #[serde(default)]
    pub memory: BTreeMap<String, String>,
    /// Port and MMIO accesses in order (`out 0xf4 1 2a`, `mmio-read 0xd0000000 4 ffffffff`).
    #[serde(default)]
    pub exits: Vec<String>,
}

fn zero_hex() -> String {
    "0x0".into()
}

/// Parses a hex number with or without `0x`.
pub fn parse_hex(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t).replace('_', "");
    // from_str_radix would take a sign ("+f"); only hex digits make a number.
    if !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(&t, 16).ok()
}

/// Parses a string of hex byte pairs (whitespace allowed).
pub fn parse_bytes(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    // from_str_radix would take a sign ("+f"); only hex digits make a byte.
    if digits.len() % 2 != 0 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| std::str::from_utf8(p).ok().and_then(|t| u8::from_str_radix(t, 16).ok()))
        .collect()
}

/// Bytes as a hex string.
pub fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The numbers of a case, parsed and checked; errors name the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// GPRs in encoding order.
    pub gprs: [u64; 16],
    /// RFLAGS.
    pub rflags: u64,
    /// Segment fields by name.
    pub segments: BTreeMap<String, u64>,
    /// Code bytes.
    pub code: Vec<u8>,
    /// Data bytes.
    pub data: Vec<u8>,
}

/// Largest code and data images a case may carry.
pub const MAX_IMAGE: usize = 4096;

/// Largest case file read: far above any case (code and data are at most [`MAX_IMAGE`] bytes
/// each; the corpus's largest file is 8 KiB), far below what could hurt to read.
pub const MAX_CASE_FILE: u64 = 1 << 20;

impl Case {
    /// Parses the numbers of the case; `file` names the case in errors.
    pub fn parse(&self, file: &str) -> Result<Parsed, FuzzError> {
        let bad = |field: &str, why: &str| FuzzError::CaseField {
            file: file.to_string(),
            field: field.to_string(),
            why: why.to_string(),
        };
        if self.format != CASE_FORMAT {
            return Err(bad("format", &format!("is {}, this duet reads format {CASE_FORMAT}", self.format)));
        }
        let mut gprs = [0u64; 16];
        for (name, v) in &self.regs {
            let i = duet_core::Regs::GPR_NAMES
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| bad(&format!("regs.{name}"), "is not a general-purpose register"))?;
            gprs[i] = parse_hex(v).ok_or_else(|| bad(&format!("regs.{name}"), "is not a hex number"))?;
        }
        let rflags = parse_hex(&self.rflags).ok_or_else(|| bad("rflags", "is not a hex number"))?;
        let mut segments = BTreeMap::new();
        for (name, v) in &self.segments {
            if !["ds", "es", "fs", "gs", "ss", "fs.base", "gs.base"].contains(&name.as_str()) {
                return Err(bad(
                    &format!("segments.{name}"),
                    "is not ds, es, fs, gs, ss, fs.base or gs.base",
                ));
            }
            let n = parse_hex(v).ok_or_else(|| bad(&format!("segments.{name}"), "is not a hex number"))?;
            segments.insert(name.clone(), n);
        }
        let code = parse_bytes(&self.code).ok_or_else(|| bad("code", "is not a string of hex byte pairs"))?;
        let data = parse_bytes(&self.data).ok_or_else(|| bad("data", "is not a string of hex byte pairs"))?;
        if code.is_empty() || code.len() > MAX_IMAGE {
            return Err(bad("code", &format!("has {} bytes; 1 to {MAX_IMAGE} are allowed", code.len())));
        }
        if data.len() > MAX_IMAGE {
            return Err(bad("data", &format!("has {} bytes; at most {MAX_IMAGE} are allowed", data.len())));
        }
        if let Some(c) = &self.cpuid {
            c.profile().map_err(|why| bad("cpuid", &why))?;
        }
        if let Some(e) = &self.expected {
            if parse_hex(&e.outcome.rflags_undefined).is_none() {
                return Err(bad("expected.outcome.rflags_undefined", "is not a hex number"));
            }
            for (k, v) in &e.outcome.memory {
                if parse_hex(k).is_none() || parse_hex(v).is_none() {
                    return Err(bad(
                        &format!("expected.outcome.memory.{k}"),
                        "address and value must be hex",
                    ));
                }
            }
        }
        Ok(Parsed { gprs, rflags, segments, code, data })
    }

    /// Reads a case file; errors name the file (and the field, for a malformed one). A file
    /// larger than [`MAX_CASE_FILE`] (or a device that never ends) is refused unread.
    pub fn load(path: &Path) -> Result<Case, FuzzError> {
        use std::io::Read;
        let file = path.display().to_string();
        let io = |e| FuzzError::Io { path: file.clone(), error: e };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CASE_FILE + 1).read_to_end(&mut bytes))
            .map_err(io)?;
        if bytes.len() as u64 > MAX_CASE_FILE {
            let why = format!("larger than {} KiB: no case file is that large", MAX_CASE_FILE >> 10);
            return Err(FuzzError::CaseSyntax { file, why });
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| FuzzError::CaseSyntax { file: file.clone(), why: format!("not UTF-8 text: {e}") })?;
        let case: Case = serde_json::from_str(&text)
            .map_err(|e| FuzzError::CaseSyntax { file: file.clone(), why: e.to_string() })?;
        case.parse(&file)?;
        Ok(case)
    }

    /// Writes the case as pretty JSON, whole or not at all: to a temporary file in the same
    /// directory, then renamed over `path`, so a process stopped mid-write leaves no cut file.
    pub fn save(&self, path: &Path) -> Result<(), FuzzError> {
        use std::io::Write;
        let file = path.display().to_string();
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| FuzzError::CaseSyntax { file: file.clone(), why: e.to_string() })?;
        let name = path.file_name().map_or_else(|| "case".into(), |n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all((text + "\n").as_bytes()).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, path));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            FuzzError::Io { path: file, error: e }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_helpers_round_trip() {
        assert_eq!(parse_hex("0x1f"), Some(0x1f));
        assert_eq!(parse_hex("ff"), Some(0xff));
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_bytes("0a ff"), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(hex_bytes(&[1, 0xab]), "01ab");
        for m in FuzzMode::ALL {
            assert_eq!(m.name().parse::<FuzzMode>(), Ok(m));
        }
    }

    fn sample() -> Case {
        Case {
            format: CASE_FORMAT,
            mode: FuzzMode::Long64,
            note: String::new(),
            regs: BTreeMap::new(),
            rflags: "0x2".into(),
            segments: BTreeMap::new(),
            code: "f4".into(),
            disasm: Vec::new(),
            data: String::new(),
            cpuid: None,
            expected: None,
        }
    }

    #[test]
    fn case_save_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("duet-case-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        std::fs::write(&path, "an older, longer file that the new case must replace whole").unwrap();
        let case = sample();
        case.save(&path).unwrap();
        assert_eq!(Case::load(&path).unwrap(), case);
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(), ["c.json"]);
        // A save whose rename fails (the target is a directory with a file in it) leaves no
        // temporary behind either.
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/keep"), "x").unwrap();
        assert!(case.save(&dir.join("sub")).is_err());
        let after = names();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(after, ["c.json", "sub"]);
    }

    #[test]
    fn case_load_refuses_what_no_case_file_can_be() {
        let err = Case::load(Path::new("/dev/zero")).unwrap_err().to_string();
        assert_eq!(err, "/dev/zero: not a duet case file: larger than 1024 KiB: no case file is that large");
    }
}
