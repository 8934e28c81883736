//! Helpers for test suites that run one guest on every backend.
//!
//! `DUET_BACKENDS=interp` (or `kvm`, or `kvm,interp`) chooses the backends; without it every
//! available backend runs. An unavailable KVM is skipped out loud, and `DUET_REQUIRE_KVM=1`
//! turns that skip into a test failure.

use crate::backends::BackendKind;

/// What [`select_backends`] decided: the backends to run and the reasons for each skip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Backends to run, hardware first.
    pub run: Vec<BackendKind>,
    /// Backends skipped, each with why.
    pub skipped: Vec<(BackendKind, String)>,
}

/// Decides which backends to run from the two environment values and KVM's availability.
///
/// Errors when `DUET_BACKENDS` names an unknown backend, or when KVM is required but unusable.
pub fn select(
    backends_var: Option<&str>,
    require_kvm: bool,
    kvm: &duet_core::Availability,
) -> Result<Selection, String> {
    let wanted: Vec<BackendKind> = match backends_var.map(str::trim).filter(|s| !s.is_empty()) {
        None | Some("all") => BackendKind::ALL.to_vec(),
        Some(list) => list.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
    };
    let mut sel = Selection { run: Vec::new(), skipped: Vec::new() };
    for kind in BackendKind::ALL {
        if !wanted.contains(&kind) {
            sel.skipped.push((kind, format!("DUET_BACKENDS={} leaves it out", backends_var.unwrap_or(""))));
            continue;
        }
        match (kind, kvm) {
            (BackendKind::Kvm, duet_core::Availability::Unavailable(why)) => {
                if require_kvm {
                    return Err(format!("DUET_REQUIRE_KVM=1 but KVM is not usable: {why}"));
                }
                sel.skipped.push((kind, why.clone()));
            }
            _ => sel.run.push(kind),
        }
    }
    Ok(sel)
}

/// The backends this test run uses; prints `skipped: <backend>: <reason>` for each one left out.
///
/// Panics (failing the test) on a bad `DUET_BACKENDS` or when `DUET_REQUIRE_KVM=1` and KVM is
/// unusable: both are mistakes in how the tests were started, not guest behaviour.
pub fn select_backends() -> Vec<BackendKind> {
    let var = std::env::var("DUET_BACKENDS").ok();
    let require = std::env::var("DUET_REQUIRE_KVM").is_ok_and(|v| v == "1");
    let kvm = if var.as_deref().is_some_and(|v| !v.contains("kvm") && v != "all") {
        duet_core::Availability::Unavailable("not requested".into())
    } else {
        BackendKind::Kvm.availability()
    };
    match select(var.as_deref(), require, &kvm) {
        Ok(sel) => {
            for (kind, why) in &sel.skipped {
                eprintln!("skipped: {kind}: {why}");
            }
            sel.run
        }
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duet_core::Availability::{Available, Unavailable};

    #[test]
    fn select_runs_everything_available_by_default() {
        let s = select(None, false, &Available("KVM API 12".into())).unwrap();
        assert_eq!(s.run, vec![BackendKind::Kvm, BackendKind::Interp]);
        assert!(s.skipped.is_empty());
    }

    #[test]
    fn select_skips_unusable_kvm_with_its_reason() {
        let s = select(None, false, &Unavailable("no /dev/kvm".into())).unwrap();
        assert_eq!(s.run, vec![BackendKind::Interp]);
        assert_eq!(s.skipped, vec![(BackendKind::Kvm, "no /dev/kvm".to_string())]);
    }

    #[test]
    fn select_honours_duet_backends_and_require_kvm() {
        let s = select(Some("interp"), false, &Available("x".into())).unwrap();
        assert_eq!(s.run, vec![BackendKind::Interp]);
        assert_eq!(s.skipped.len(), 1);
        assert!(select(None, true, &Unavailable("no /dev/kvm".into())).unwrap_err().contains("no /dev/kvm"));
        assert!(select(Some("kvm,bochs"), false, &Available("x".into())).unwrap_err().contains("bochs"));
    }
}
