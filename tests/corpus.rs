//! The committed corpus: cases whose expected result was recorded on hardware (or decided by a
//! reference), replayed on the interpreter — so the software CPU is checked against hardware
//! results on hosts without KVM too — and on KVM where it is usable.
//!
//! `fixtures/corpus/regressions/` must match exactly. `fixtures/corpus/divergences/` holds the
//! open divergences found by `duet fuzz`, each with its analysis in the `note`: they are
//! reported loudly and do not fail the run; one that starts to match fails it, with the
//! instruction to move it to `regressions/`. A case whose result depends on the CPUID profile
//! names that profile (`cpuid`), so it runs the same on every host; KVM replays a case only
//! when the case's profile is this host's shared one.

use std::path::{Path, PathBuf};

use duet::backends::BackendKind;
use duet::fuzz::check::{against_recorded, compare_runs};
use duet::fuzz::exec::Executor;
use duet::fuzz::judge::{host_limit, kvm_is_pvm, KVM_PVM_LIMITS};
use duet::fuzz::profile::CaseCpuid;
use duet::fuzz::{layout, Case};
use duet::shared_cpuid_profile;
use duet::testing::select_backends;

fn cases(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/corpus").join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
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

#[test]
fn corpus_regressions_match_recorded_hardware_results() {
    let files = cases("regressions");
    assert!(!files.is_empty(), "the regression corpus is empty");
    let backends = select_backends();
    let mut interp = Executor::new(BackendKind::Interp, timeout());
    let mut kvm = backends.contains(&BackendKind::Kvm).then(|| Executor::new(BackendKind::Kvm, timeout()));
    let mut failures = Vec::new();
    for path in &files {
        let file = path.display().to_string();
        let case = Case::load(path).unwrap_or_else(|e| panic!("{e}"));
        let expected = case.expected.as_ref().unwrap_or_else(|| panic!("{file}: no expected result"));
        match against_recorded(&mut interp, &case, &file) {
            Ok(Some(d)) if !d.is_empty() => {
                failures.push(format!("{file}: interp differs from {}:\n{d}", expected.source))
            }
            Ok(_) => {}
            Err(e) => failures.push(format!("{file}: {e}")),
        }
        // The same case on this host's KVM, when it can decide it.
        if let Some(kvm) = kvm.as_mut() {
            let (p, state) = layout::prepare(&case, &file).unwrap_or_else(|e| panic!("{e}"));
            let limits = if kvm_is_pvm() { KVM_PVM_LIMITS } else { &[] };
            let same_profile =
                case.cpuid.as_ref().is_none_or(|c| *c == CaseCpuid::of(&shared_cpuid_profile()));
            if expected.source == "kvm" && same_profile && host_limit(&case, &p.code, limits).is_none() {
                let run = kvm.run(&case, &p, &state).unwrap_or_else(|e| panic!("{file}: {e}"));
                let d = compare_runs(&p, &case, ("recorded", &expected.outcome), ("kvm", &run.outcome));
                if !d.is_empty() {
                    failures.push(format!("{file}: KVM on this host differs from the recording:\n{d}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases fail:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!("corpus: {} regression cases match", files.len());
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
        match against_recorded(&mut interp, &case, &file) {
            Ok(Some(d)) if !d.is_empty() => {
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
