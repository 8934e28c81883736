//! Every fixture on every available backend, checked against its expected outcome (from
//! independent facts: the SDM, plain-Rust models, arithmetic), against the reviewed snapshot
//! of its final state recorded on KVM, and differentially (KVM against the software CPU).
//! A snapshot names the host and CPUID profile it was recorded under: KVM is checked against it
//! only on such a host, the software CPU always, under that profile (`duet::recording`).

use duet::fixtures::{catalogue, find, Fixture};
use duet::recording::snapshot_replay;
use duet::{compare, run_guest, shared_cpuid_profile, testing, BackendKind, Host, RunConfig, RunReport};

/// The final state as reviewed text: stop, console, registers; undefined RFLAGS bits masked.
fn snapshot_text(report: &RunReport, undefined_rflags: u64) -> String {
    let mut state = report.outcome.state.clone();
    state.regs.rflags &= !undefined_rflags;
    format!(
        "stop: {}\nconsole: {:?}\n{}\n",
        report.outcome.stop,
        report.console_text(),
        duet::run::format_regs(&state)
    )
}

/// Runs `fixture` on every selected backend and checks each run three ways.
fn check_fixture(fixture: &Fixture) {
    let guest = fixture.guest().unwrap_or_else(|e| panic!("{}: cannot build: {e}", fixture.name));
    let mut reports = Vec::new();
    for kind in testing::select_backends() {
        let report = run_guest(&*kind.create(), &guest, &RunConfig::default())
            .unwrap_or_else(|e| panic!("{} on {kind}: {e}", fixture.name));
        if let Err(why) = fixture.expected.check(&report.outcome.stop, &report.console_text()) {
            panic!("{} on {kind}: {why}\n{}", fixture.name, snapshot_text(&report, 0));
        }
        reports.push((kind, report));
    }
    // The software CPU knows which flags are undefined; the same mask applies to every side.
    let undefined = reports
        .iter()
        .find(|(k, _)| *k == BackendKind::Interp)
        .map_or(0, |(_, r)| r.outcome.undefined_rflags);
    // A fixture whose console depends on the host (the CPUID vendor KVM passes through) has no
    // host-independent snapshot; its expected outcome and the differential check still apply.
    let host_independent = fixture.expected.console.is_some();
    if host_independent {
        check_snapshot(fixture, &guest, &reports, undefined);
    }
    if let [(_, kvm), (_, interp)] = &reports[..] {
        let diff = compare(kvm, interp);
        assert!(diff.is_empty(), "{}: KVM and the software CPU differ:\n{diff}", fixture.name);
    }
}

/// Checks the runs against the fixture's snapshot under the replay rules of [`duet::recording`]:
/// KVM only on the host the snapshot was recorded on, the software CPU under its profile.
fn check_snapshot(
    fixture: &Fixture,
    guest: &duet::Guest,
    reports: &[(BackendKind, RunReport)],
    undefined: u64,
) {
    let name = fixture.name;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots").join(format!("{name}.snap"));
    let committed = std::fs::read_to_string(&path).ok();
    let kvm_ran = reports.iter().any(|(k, _)| *k == BackendKind::Kvm);
    let replay = snapshot_replay(committed.as_deref(), Host::this(), kvm_ran, &shared_cpuid_profile())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (kind, report) in reports {
        let text = match (kind, &replay.interp_profile) {
            (BackendKind::Kvm, _) => match &replay.kvm {
                Ok(()) => snapshot_text(report, undefined),
                Err(why) => {
                    eprintln!("skipped: kvm vs snapshot `{name}`: {why}");
                    continue;
                }
            },
            (BackendKind::Interp, None) => snapshot_text(report, undefined),
            (BackendKind::Interp, Some(profile)) => {
                let config = RunConfig { cpuid: profile.clone(), ..RunConfig::default() };
                let r = run_guest(&*kind.create(), guest, &config)
                    .unwrap_or_else(|e| panic!("{name} on {kind}: {e}"));
                snapshot_text(&r, r.outcome.undefined_rflags)
            }
        };
        insta::with_settings!({ snapshot_suffix => "", prepend_module_to_snapshot => false, description => format!("final state of `{name}`, recorded on KVM and reviewed"), info => &replay.info }, {
            insta::assert_snapshot!(fixture.name, text);
        });
    }
}

macro_rules! fixture_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check_fixture(&find($name).expect(concat!("fixture ", $name, " exists")));
            }
        )*

        #[test]
        fn every_fixture_has_a_test() {
            let tested = [$($name),*];
            for f in catalogue() {
                assert!(tested.contains(&f.name), "fixture `{}` has no test in tests/fixtures.rs", f.name);
            }
        }
    };
}

fixture_tests! {
    fixture_hello => "hello",
    fixture_hlt => "hlt",
    fixture_pio_loop => "pio-loop",
    fixture_mmio_loop => "mmio-loop",
    fixture_alu => "alu",
    fixture_exceptions => "exceptions",
    fixture_paging => "paging",
    fixture_mode_switch => "mode-switch",
    fixture_cpuid_msr => "cpuid-msr",
    fixture_sieve => "sieve",
    fixture_irq => "irq",
    fixture_fault_real => "fault-real",
    fixture_fault_protected => "fault-protected",
    fixture_fault_long => "fault-long",
    fixture_alu_bits => "alu-bits",
    fixture_strings => "strings",
    fixture_stack => "stack",
    fixture_real_segments => "real-segments",
}
