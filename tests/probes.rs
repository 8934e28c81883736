//! The known-defect probes on the software CPU: where this host's KVM is wrong, the SDM
//! decides, and the software CPU must give the SDM's result (each probe's expectation is
//! worked out from the SDM in fixtures/src/probes).

use duet::fixtures::probes::{find_probe, probes};
use duet::{run_guest, BackendKind, RunConfig, StopReason};

/// Probes of instructions the software CPU does not implement yet (the full integer ISA is
/// issue 5): they must stop as `Unsupported` naming the instruction, never run wrongly.
const NOT_YET_IMPLEMENTED: [(&str, &str); 6] = [
    ("daa", "daa"),
    ("aaa", "aaa"),
    ("aas", "aas"),
    ("arpl", "arpl"),
    ("bound", "bound"),
    ("syscall-ring3", "syscall"),
];

#[test]
fn probes_give_the_sdm_result_on_the_software_cpu() {
    let backend = BackendKind::Interp.create();
    for probe in probes() {
        let f = &probe.fixture;
        let guest = f.guest().unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let report =
            run_guest(&*backend, &guest, &RunConfig::default()).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        match NOT_YET_IMPLEMENTED.iter().find(|(name, _)| *name == f.name) {
            Some((_, mnemonic)) => match &report.outcome.stop {
                StopReason::Unsupported(i) => assert!(i.mnemonic.contains(mnemonic), "{}: {}", f.name, i),
                other => {
                    // Implemented since this list was written: then it must match the SDM.
                    f.expected.check(other, &report.console_text()).unwrap_or_else(|why| {
                        panic!("{}: {why}; remove it from NOT_YET_IMPLEMENTED", f.name)
                    });
                }
            },
            None => f
                .expected
                .check(&report.outcome.stop, &report.console_text())
                .unwrap_or_else(|why| panic!("{}: {why}", f.name)),
        }
    }
}

#[test]
fn every_listed_probe_exists() {
    for (name, _) in NOT_YET_IMPLEMENTED {
        assert!(find_probe(name).is_some(), "no probe `{name}`");
    }
}
