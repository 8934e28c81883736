//! `duet doctor`: what this host offers, how fast each backend is, and what `auto` and
//! `fastest` pick.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use duet::BackendKind;

use crate::cli::DoctorArgs;

/// Prints the host checklist, both backends' availability and speed, and the choices of `auto`
/// and `fastest`.
pub fn doctor(args: &DoctorArgs) -> Result<ExitCode> {
    let host = duet::host::Host::this();
    // The host that recorded results and KVM limits are judged against (CI prints this first).
    println!("host: {}, CPU vendor {}, KVM {}", std::env::consts::ARCH, host.vendor.name(), host.kvm);
    let facts = duet::doctor::HostFacts::gather_with(Path::new("/"), &duet::backends::kvm_device());
    println!("{facts}");
    for kind in BackendKind::ALL {
        match kind.availability() {
            duet::Availability::Available(what) => println!("backend {kind:<6} available: {what}"),
            duet::Availability::Unavailable(why) => println!("backend {kind:<6} unavailable: {why}"),
        }
    }
    match duet::qemu::availability() {
        duet::Availability::Available(what) => println!("reference qemu  available: {what}"),
        duet::Availability::Unavailable(why) => println!("reference qemu  unavailable: {why}"),
    }
    let (kind, why) = duet::auto();
    println!("auto picks {kind}: {why}");
    speeds();
    if args.kvm_selfcheck {
        kvm_selfcheck()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Each usable backend's speed on the calibration loop, and which is faster here.
fn speeds() {
    let c = duet::backends::Calibration::measure();
    println!(
        "\nspeed on this host (the same ALU loop, {} instructions, on each backend):",
        duet::backends::CALIBRATION_INSTRUCTIONS
    );
    for s in &c.speeds {
        println!("  {:<6} {:>8.2} MIPS  ({:.3} ms)", s.kind.name(), s.mips(), s.wall.as_secs_f64() * 1e3);
    }
    for (kind, why) in &c.skipped {
        println!("  {:<6} {why}", kind.name());
    }
    let (fast, why) = c.choice();
    let (auto, _) = duet::auto();
    println!("fastest picks {fast}: {why}");
    if fast != auto {
        println!("  `--backend fastest` runs on {fast}; `auto` keeps {auto}, the reference for fidelity.");
    }
}

/// Runs every probe of a known nested-KVM defect on KVM (and on the software CPU for
/// reference) and says which ones this host's KVM gets wrong against the SDM's result.
fn kvm_selfcheck() -> Result<()> {
    use duet::{run_guest, RunConfig};
    use std::time::Duration;

    let kvm_usable = BackendKind::Kvm.availability().is_available();
    if !kvm_usable {
        println!("\nKVM self-check skipped: KVM is not usable here.");
        return Ok(());
    }
    println!("\nKVM self-check (each probe's expected result is the SDM's; deadline 3 s each):");
    let config = RunConfig { timeout: Duration::from_secs(3), ..RunConfig::default() };
    let mut wrong = 0;
    let probes = duet_fixtures::probes::probes();
    for probe in &probes {
        let f = &probe.fixture;
        let guest = f.guest()?;
        // One short line per backend: whether the run matched the SDM, else how it ended.
        let verdict = |kind: BackendKind| match run_guest(&*kind.create(), &guest, &config) {
            Ok(r) => match f.expected.check(&r.outcome.stop, &r.console_text()) {
                Ok(()) => (true, "matches the SDM".to_string()),
                Err(_) => (false, format!("ended with {}", r.outcome.stop)),
            },
            Err(e) => (false, format!("error: {e}")),
        };
        let (kvm_ok, kvm_what) = verdict(BackendKind::Kvm);
        let (_, interp_what) = verdict(BackendKind::Interp);
        wrong += usize::from(!kvm_ok);
        println!("  {} {:<14} {}", if kvm_ok { "ok   " } else { "WRONG" }, f.name, f.summary);
        println!("        kvm:          {kvm_what}");
        if !kvm_ok {
            println!("        known here:   {}", probe.kvm_pvm);
        }
        println!("        software CPU: {interp_what}");
    }
    println!(
        "{wrong} of {} probes show a KVM defect; where KVM is wrong, duet's tests take the expected result from the SDM.",
        probes.len()
    );
    Ok(())
}
