//! Case files: a generated program with its start state and, once run, the hardware's result.
//!
//! A case is small readable JSON: the mode, the registers, the code bytes (with disassembly,
//! for the reader), the data bytes, and the expected outcome with where it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use duet_core::Vendor;
use serde::{Deserialize, Serialize};

pub use super::outcome::Outcome;
use super::outcome::{FieldError, OutcomeFile};
use super::profile::{host_vendor_name, host_vendor_of_name};
use super::FuzzError;
use crate::host::Host;

/// Version of the case-file format this build writes: 2 added `expected.recorded_on`, the host
/// a KVM result was recorded on.
pub const CASE_FORMAT: u32 = 2;

/// The oldest case-file format this build reads (a format-1 KVM result has no host: it is
/// checked against the software CPU, never against KVM).
pub const OLDEST_CASE_FORMAT: u32 = 1;

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
    /// The CPUID profile the case runs under (vendor and optional features) on every backend and
    /// reference, and so the profile its expected result holds for; absent means this process's
    /// shared profile ([`crate::backends::shared_cpuid_profile`]), which is host-dependent (every
    /// committed KVM recording names its profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuid: Option<super::profile::CaseCpuid>,
    /// The result a correct CPU produces, and which opinion it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Expected>,
}

/// Where an expected result came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Recorded on KVM: the hardware's word where KVM is the silicon, and it holds on the host it
    /// was recorded on ([`Expected::recorded_on`]).
    Kvm,
    /// The QEMU reference's result (host-independent).
    Qemu,
    /// Worked out by hand from the SDM / AMD APM, cited in the note (host-independent).
    Sdm,
}

impl Source {
    /// The name case files use (`kvm`, `qemu`, `sdm`).
    pub fn name(self) -> &'static str {
        match self {
            Source::Kvm => "kvm",
            Source::Qemu => "qemu",
            Source::Sdm => "sdm",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Source::Kvm, Source::Qemu, Source::Sdm]
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| format!("is `{s}`, not a source (kvm, qemu or sdm)"))
    }
}

/// An expected outcome, where it came from and, for a KVM recording, the host it was recorded on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ExpectedFile", into = "ExpectedFile")]
pub struct Expected {
    /// Which opinion gave the result.
    pub source: Source,
    /// The host a KVM recording was made on (vendor and KVM kind); `None` for QEMU and SDM
    /// results, which hold on every host, and for a format-1 recording, whose host is unknown
    /// (KVM is then never compared with it; the software CPU still is).
    pub recorded_on: Option<Host>,
    /// The outcome.
    pub outcome: Outcome,
}

impl Expected {
    /// A result recorded just now on this host's KVM.
    pub fn recorded_here(outcome: Outcome) -> Expected {
        Expected { source: Source::Kvm, recorded_on: Some(Host::this()), outcome }
    }

    /// A host-independent result from `source` (QEMU or the SDM).
    pub fn from_source(source: Source, outcome: Outcome) -> Expected {
        Expected { source, recorded_on: None, outcome }
    }
}

/// [`Expected`] as a case file spells it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ExpectedFile {
    source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recorded_on: Option<HostFile>,
    outcome: OutcomeFile,
}

/// A host as a case file spells it: `{"vendor": "AuthenticAMD", "kvm": "kvm_pvm"}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct HostFile {
    vendor: String,
    kvm: String,
}

impl TryFrom<ExpectedFile> for Expected {
    type Error = FieldError;
    fn try_from(f: ExpectedFile) -> Result<Self, FieldError> {
        let bad = |field: &str, why: String| FieldError { field: field.into(), why };
        let source = f.source.parse().map_err(|why| bad("source", why))?;
        let recorded_on = match f.recorded_on {
            Some(_) if source != Source::Kvm => {
                return Err(bad(
                    "recorded_on",
                    format!("is given for a {source} result, which holds on every host"),
                ))
            }
            Some(h) => Some(Host {
                vendor: host_vendor_of_name(&h.vendor).map_err(|why| bad("recorded_on.vendor", why))?,
                kvm: h.kvm.parse().map_err(|why| bad("recorded_on.kvm", why))?,
            }),
            None => None,
        };
        let outcome = Outcome::try_from(f.outcome).map_err(|e| e.within("outcome"))?;
        Ok(Expected { source, recorded_on, outcome })
    }
}

impl From<Expected> for ExpectedFile {
    fn from(e: Expected) -> Self {
        ExpectedFile {
            source: e.source.name().into(),
            recorded_on: e
                .recorded_on
                .map(|h| HostFile { vendor: host_vendor_name(h.vendor).into(), kvm: h.kvm.name().into() }),
            outcome: e.outcome.into(),
        }
    }
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
    /// Mode and privilege level at the first instruction.
    pub mode: FuzzMode,
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
    /// The vendor of the profile the case runs under: the software CPU decodes as that vendor
    /// does (a 66h near branch in 64-bit mode is 16-bit on AMD), so the judge must too.
    pub vendor: Vendor,
}

impl Parsed {
    /// iced-x86's decoder options for the case's vendor ([`Parsed::vendor`]).
    pub fn decoder_options(&self) -> u32 {
        match self.vendor {
            Vendor::Amd => iced_x86::DecoderOptions::AMD,
            Vendor::Intel | Vendor::Other => iced_x86::DecoderOptions::NONE,
        }
    }

    /// Every way the case's bytes may be decoded by one of the backends: as the profile's vendor
    /// does (the software CPU; the silicon, which runs ring-3 code natively under kvm_pvm), and as
    /// KVM's instruction emulator does, which decodes Intel's way whatever the vendor (REX.W far
    /// pointers, 66h near branches). Host limits and undefined flags are looked for in all.
    pub fn decodings(&self) -> Vec<u32> {
        let mut v = vec![self.decoder_options()];
        if !v.contains(&iced_x86::DecoderOptions::NONE) {
            v.push(iced_x86::DecoderOptions::NONE);
        }
        v
    }

    /// A case of `mode` with only `code` (registers zero, RFLAGS 2, no data, an Intel profile):
    /// for tests that judge a program without running it.
    pub fn of_code(mode: FuzzMode, code: &[u8]) -> Parsed {
        Parsed {
            vendor: Vendor::Intel,
            mode,
            gprs: [0; 16],
            rflags: 2,
            segments: BTreeMap::new(),
            code: code.to_vec(),
            data: Vec::new(),
        }
    }
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
        if !(OLDEST_CASE_FORMAT..=CASE_FORMAT).contains(&self.format) {
            return Err(bad(
                "format",
                &format!("is {}, this duet reads formats {OLDEST_CASE_FORMAT} to {CASE_FORMAT}", self.format),
            ));
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
        let vendor = match &self.cpuid {
            Some(c) => c.vendor,
            None => crate::backends::shared_cpuid_profile().vendor_kind(),
        };
        Ok(Parsed { mode: self.mode, gprs, rflags, segments, code, data, vendor })
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
        Case::from_json(&text, &file)
    }

    /// Parses a case from its JSON text, checking every field once, here: the judge then works
    /// on typed values. `file` names the case in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Case, FuzzError> {
        let syntax = |why: String| FuzzError::CaseSyntax { file: file.to_string(), why };
        let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| syntax(e.to_string()))?;
        // The expected block and the profile are read on their own, so an error names its field.
        let mut take = |key: &str| v.as_object_mut().and_then(|o| o.remove(key)).filter(|e| !e.is_null());
        let (expected, cpuid) = (take("expected"), take("cpuid"));
        let mut case: Case = serde_json::from_value(v).map_err(|e| syntax(e.to_string()))?;
        if let Some(c) = cpuid {
            let field =
                |why: String| FuzzError::CaseField { file: file.to_string(), field: "cpuid".into(), why };
            case.cpuid = Some(serde_json::from_value(c).map_err(|e| field(e.to_string()))?);
        }
        if let Some(e) = expected {
            let raw: ExpectedFile =
                serde_json::from_value(e).map_err(|e| syntax(format!("field `expected`: {e}")))?;
            let e = Expected::try_from(raw).map_err(|e| {
                let e = e.within("expected");
                FuzzError::CaseField { file: file.to_string(), field: e.field, why: e.why }
            })?;
            case.expected = Some(e);
        }
        case.parse(file)?;
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

    #[test]
    fn a_recording_names_its_host_and_only_a_kvm_result_has_one() {
        use duet_core::{StopReason, Vendor};

        use crate::host::KvmKind;
        let outcome = Outcome::stopped(StopReason::Shutdown);
        for vendor in [Vendor::Intel, Vendor::Amd, Vendor::Other] {
            let on = Host { vendor, kvm: KvmKind::Pvm };
            let e = Expected { source: Source::Kvm, recorded_on: Some(on), outcome: outcome.clone() };
            let text = serde_json::to_string(&e).unwrap_or_default();
            assert_eq!(serde_json::from_str::<Expected>(&text).ok(), Some(e), "{text}");
        }
        let json = |source: &str| {
            format!(
                r#"{{"source":"{source}","recorded_on":{{"vendor":"AuthenticAMD","kvm":"kvm_pvm"}},"outcome":{{"stop":"halted","state":{{}}}}}}"#
            )
        };
        assert!(serde_json::from_str::<Expected>(&json("kvm")).is_ok());
        let e = serde_json::from_str::<Expected>(&json("sdm")).unwrap_err().to_string();
        assert!(e.contains("field `recorded_on` is given for a sdm result"), "{e}");
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
