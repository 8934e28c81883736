//! The committed corpus: cases whose expected result was recorded on hardware (or decided by a
//! reference), replayed on the interpreter — so the software CPU is checked against hardware
//! results on hosts without KVM too — and on KVM where it is usable.
//!
//! `fixtures/corpus/regressions/` must match exactly. `fixtures/corpus/divergences/` holds the
//! open divergences found by `duet fuzz`, each with its analysis in the `note`: they are
//! reported loudly and do not fail the run; one that starts to match fails it, with the
//! instruction to move it to `regressions/`.
//!
//! Replay rules (`duet::recording`): every KVM recording names the host it was recorded on
//! (vendor and KVM kind) and the CPUID profile it ran under. The software CPU is checked against
//! every case under the case's own profile, whatever the host; KVM is compared with a recording
//! only on a host of the same vendor and KVM kind whose shared profile is the recording's, and
//! with the software CPU's undefined-flags mask for the case (neither hardware side has one).

use std::path::{Path, PathBuf};

use duet::backends::BackendKind;
use duet::core::state::rflags;
use duet::core::Vendor;
use duet::fuzz::check::{interp_against_recorded, kvm_against_recorded};
use duet::fuzz::exec::Executor;
use duet::fuzz::limits::{AMD_PVM, INTEL_PVM};
use duet::fuzz::outcome::Field;
use duet::fuzz::profile::{CaseCpuid, Feature};
use duet::fuzz::{layout, Case, FuzzError, Source};
use duet::recording::corpus_kvm_replay;
use duet::testing::select_backends;
use duet::{shared_cpuid_profile, Host, KvmKind};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus").join(name)
}

fn cases(name: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir(name))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

fn load(name: &str) -> Case {
    let path = dir("regressions").join(name);
    Case::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The profile every committed KVM recording ran under on the AMD kvm_pvm host it was made on.
fn amd_cx16() -> CaseCpuid {
    CaseCpuid { vendor: Vendor::Amd, features: [Feature::Cx16].into() }
}

#[test]
fn corpus_regressions_match_recorded_hardware_results() {
    let files = cases("regressions");
    assert!(!files.is_empty(), "the regression corpus is empty");
    let host = Host::this();
    let shared = CaseCpuid::of(&shared_cpuid_profile());
    let mut interp = Executor::new(BackendKind::Interp, timeout());
    let mut kvm =
        select_backends().contains(&BackendKind::Kvm).then(|| Executor::new(BackendKind::Kvm, timeout()));
    let mut failures = Vec::new();
    let (mut replayed, mut not_replayed) = (0, Vec::new());
    for path in &files {
        let file = path.display().to_string();
        let case = Case::load(path).unwrap_or_else(|e| panic!("{e}"));
        let expected = case.expected.as_ref().unwrap_or_else(|| panic!("{file}: no expected result"));
        if expected.source == Source::Kvm && (expected.recorded_on.is_none() || case.cpuid.is_none()) {
            failures.push(format!("{file}: a KVM recording must name `expected.recorded_on` and `cpuid`"));
        }
        // The software CPU, under the case's own profile, whatever this host is.
        let interp_run = match interp_against_recorded(&mut interp, &case, &file) {
            Ok(Some((d, run))) => {
                if !d.is_empty() {
                    failures.push(format!("{file}: interp differs from {}:\n{d}", expected.source));
                }
                run
            }
            Ok(None) => unreachable!("checked above"),
            Err(e) => {
                failures.push(format!("{file}: {e}"));
                continue;
            }
        };
        // This host's KVM, where the replay rules allow it.
        let Some(kvm) = kvm.as_mut() else { continue };
        if let Err(why) = corpus_kvm_replay(&case, host, &shared) {
            // The limit's name is enough here; its reason is in src/fuzz/limits.rs.
            let why = why.split(": ").next().unwrap_or_default();
            not_replayed.push(format!("{}: {why}", path.file_name().unwrap_or_default().to_string_lossy()));
            continue;
        }
        let (p, state) = layout::prepare(&case, &file).unwrap_or_else(|e| panic!("{e}"));
        let run = kvm.run(&case, &p, &state).unwrap_or_else(|e| panic!("{file}: {e}"));
        let d = kvm_against_recorded(&p, &expected.outcome, &run.outcome, &interp_run.outcome);
        if !d.is_empty() {
            failures.push(format!("{file}: KVM on this host differs from the recording:\n{d}"));
        }
        replayed += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases fail:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!("corpus: {} regression cases match on the software CPU", files.len());
    if kvm.is_some() {
        eprintln!("corpus: {replayed} replayed on this host's KVM ({host}, profile `{shared}`); not replayed on KVM:");
        for why in &not_replayed {
            eprintln!("  skipped: kvm: {why}");
        }
    }
}

#[test]
fn corpus_kvm_recordings_name_the_amd_kvm_pvm_host_and_profile_they_were_recorded_on() {
    // Every committed KVM result was recorded on the AMD kvm_pvm development host, under its
    // shared profile (AuthenticAMD, CX16 the only optional feature its KVM supports).
    for path in cases("regressions").iter().chain(&cases("divergences")) {
        let case = Case::load(path).unwrap_or_else(|e| panic!("{e}"));
        let Some(e) = case.expected.as_ref().filter(|e| e.source == Source::Kvm) else { continue };
        assert_eq!(e.recorded_on, Some(AMD_PVM), "{}", path.display());
        assert_eq!(case.cpuid, Some(amd_cx16()), "{}", path.display());
    }
}

#[test]
fn corpus_replay_compares_kvm_with_a_recording_only_on_the_host_it_was_recorded_on() {
    let amd = load("agree-long64-7ea-19.json");
    assert_eq!(corpus_kvm_replay(&amd, AMD_PVM, &amd_cx16()), Ok(()));
    // On an Intel kvm_pvm host this AMD recording is not compared with KVM (the software CPU
    // still is, under the recording's AMD profile: the case names it).
    let intel = CaseCpuid { vendor: Vendor::Intel, ..amd_cx16() };
    let why = corpus_kvm_replay(&amd, INTEL_PVM, &intel).unwrap_err();
    assert!(
        why.contains("recorded on AuthenticAMD with kvm_pvm, this host is GenuineIntel with kvm_pvm"),
        "{why}"
    );
    assert_eq!(amd.cpuid.as_ref().map(|c| c.vendor), Some(Vendor::Amd));
    // Nor on AMD bare metal: another KVM, whose results are the silicon's.
    let svm = Host { vendor: Vendor::Amd, kvm: KvmKind::Svm };
    assert!(corpus_kvm_replay(&amd, svm, &amd_cx16()).is_err());
    // Nor under another profile on the same host.
    let more = CaseCpuid { features: [Feature::Cx16, Feature::Bmi1].into(), ..amd_cx16() };
    assert!(corpus_kvm_replay(&amd, AMD_PVM, &more).unwrap_err().contains("profile"));
    // An SDM result is never compared with KVM (KVM is wrong there), on any host.
    let sdm = load("push-sp1-real-mode-shutdown.json");
    assert!(corpus_kvm_replay(&sdm, AMD_PVM, &amd_cx16()).unwrap_err().contains("sdm"));
    // A case KVM is known not to decide on the host (VERR under kvm_pvm) is not replayed there.
    let verr = load("agree-prot32-7ea-106.json");
    let why = corpus_kvm_replay(&verr, AMD_PVM, &amd_cx16()).unwrap_err();
    assert!(why.starts_with("known KVM limit `pvm-emulation-failure`"), "{why}");
}

/// The cases where this host's silicon and an Intel host's differ in AF alone, AF being
/// undefined after their last flag-writing instruction (SDM Vol. 2A AND/OR/XOR: "The state of
/// the AF flag is undefined"; issue 11: recorded 0x56/0x456/0x216, Intel 0x46/0x446/0x206).
const AF_CASES: [&str; 4] = [
    "agree-long64-7ea-19.json",
    "agree-real-7ea-131.json",
    "agree-real-7ea-151.json",
    "undefined-af-survives-zero-count-cmps.json",
];

#[test]
fn corpus_kvm_against_recording_masks_the_flags_the_software_cpu_knows_are_undefined() {
    let mut interp = Executor::new(BackendKind::Interp, timeout());
    for name in AF_CASES {
        let case = load(name);
        let (p, _) = layout::prepare(&case, name).unwrap_or_else(|e| panic!("{e}"));
        let Ok(Some((d, run))) = interp_against_recorded(&mut interp, &case, name) else { panic!("{name}") };
        assert!(d.is_empty(), "{name}: the software CPU matches the recording:\n{d}");
        assert_ne!(run.outcome.rflags_undefined & rflags::AF, 0, "{name}: AF is undefined at the end");
        assert_eq!(run.outcome.rflags_undefined & rflags::ZF, 0, "{name}: ZF is defined at the end");
        let recorded = &case.expected.as_ref().unwrap_or_else(|| panic!("{name}")).outcome;
        // Another host's silicon: the recording with AF flipped still matches …
        let mut other = recorded.clone();
        let rf = other.state.get_mut(&Field::Rflags).unwrap_or_else(|| panic!("{name}: no rflags"));
        *rf ^= rflags::AF;
        let d = kvm_against_recorded(&p, recorded, &other, &run.outcome);
        assert!(d.is_empty(), "{name}: AF is undefined, yet:\n{d}");
        // … and with a defined flag flipped it does not.
        *other.state.get_mut(&Field::Rflags).unwrap_or_else(|| panic!("{name}")) ^= rflags::AF | rflags::ZF;
        let d = kvm_against_recorded(&p, recorded, &other, &run.outcome);
        assert_eq!(d.rows.len(), 1, "{name}: ZF is defined:\n{d}");
    }
}

#[test]
fn corpus_case_with_an_unknown_stop_is_refused_at_load_naming_file_and_field() {
    let text = std::fs::read_to_string(dir("regressions").join("rf-in-fault-frame.json")).unwrap_or_default();
    let bad = text.replacen("\"stop\": \"exception #UD", "\"stop\": \"exploded #UD", 1);
    assert!(bad != text, "the case's stop is an #UD");
    match Case::from_json(&bad, "exploded.json") {
        Err(FuzzError::CaseField { file, field, why }) => {
            assert_eq!((file.as_str(), field.as_str()), ("exploded.json", "expected.outcome.stop"));
            assert!(why.contains("`exploded #UD error 0x0 at 0x8000`, not a stop"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    let bad = text.replacen("\"rsp\": \"0x73fe0\"", "\"rsp\": \"0xq73fe0\"", 1);
    let e = Case::from_json(&bad, "rsp.json").unwrap_err().to_string();
    assert_eq!(e, "rsp.json: field `expected.outcome.state.rsp` is not a hex number");
    let bad = text.replacen("\"kvm\": \"kvm_pvm\"", "\"kvm\": \"kvm_arm\"", 1);
    let e = Case::from_json(&bad, "host.json").unwrap_err().to_string();
    assert!(e.starts_with("host.json: field `expected.recorded_on.kvm` unknown KVM kind `kvm_arm`"), "{e}");
}

#[test]
fn corpus_open_divergences_are_reported_loudly() {
    let mut interp = Executor::new(BackendKind::Interp, timeout());
    let files = cases("divergences");
    let mut open = 0;
    let mut fixed = Vec::new();
    for path in &files {
        let file = path.display().to_string();
        let case = Case::load(path).unwrap_or_else(|e| panic!("{e}"));
        assert!(case.note.contains("analysis:"), "{file}: a divergence case needs its analysis in `note`");
        match interp_against_recorded(&mut interp, &case, &file) {
            Ok(Some((d, _))) if !d.is_empty() => {
                open += 1;
                let why = case.note.lines().find(|l| l.starts_with("analysis:")).unwrap_or("");
                eprintln!("KNOWN OPEN DIVERGENCE (interpreter vs recorded hardware result; see the analysis): {file}\n  {why}\n{d}");
            }
            Ok(_) => fixed.push(file),
            Err(e) => panic!("{file}: {e}"),
        }
    }
    assert!(
        fixed.is_empty(),
        "FIXED: these open divergences now match their expected result; move each to \
         fixtures/corpus/regressions/ (with its analysis kept in `note`):\n{}",
        fixed.join("\n")
    );
    if open > 0 {
        eprintln!(
            "WARNING: {open} of {} known divergences between the interpreter and hardware are still open",
            files.len()
        );
    }
}
