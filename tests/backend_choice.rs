//! `--backend fastest` and `duet doctor`'s speeds, as a user sees them. Which backend wins
//! depends on the host, so these tests check that a choice is made, named and explained,
//! never which one or how fast.

use std::process::{Command, Output};

fn duet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duet")).args(args).output().expect("the duet binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kvm_usable() -> bool {
    duet::BackendKind::Kvm.availability().is_available()
}

#[test]
fn run_backend_fastest_runs_hello_and_names_its_choice_and_why() {
    let out = duet(&["run", "--backend", "fastest"]);
    let err = text(&out.stderr);
    assert_eq!(text(&out.stdout), "Hello from duet!\n", "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
    let line = err.lines().find(|l| l.starts_with("[fastest] picks ")).unwrap_or_else(|| panic!("{err}"));
    let picked = if line.starts_with("[fastest] picks kvm: ") { "kvm" } else { "interp" };
    assert!(line.starts_with(&format!("[fastest] picks {picked}: measured on this host: ")), "{line}");
    // The reason gives the software CPU's speed, and KVM's or why KVM is left out.
    assert!(line.contains("interp ") && line.contains(" MIPS"), "{line}");
    if kvm_usable() {
        assert!(line.contains("kvm ") && line.contains("× faster"), "{line}");
    } else {
        assert_eq!(picked, "interp", "{line}");
        assert!(line.contains("kvm not usable: "), "{line}");
    }
    // The guest ran on the backend it named.
    assert!(err.contains(&format!("[{picked}] halted")), "{err}");
}

#[test]
fn run_help_documents_auto_and_fastest() {
    let help = text(&duet(&["run", "--help"]).stdout);
    assert!(help.contains("fastest") && help.contains("calibration loop"), "{help}");
    assert!(help.contains("`auto` is about fidelity") && help.contains("`fastest` is about speed"), "{help}");
}

#[test]
fn doctor_reports_each_backends_speed_and_which_is_faster() {
    let out = duet(&["doctor"]);
    let doc = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(doc.contains("speed on this host (the same ALU loop, 8000 instructions"), "{doc}");
    let speed_line =
        |kind: &str| doc.lines().any(|l| l.starts_with(&format!("  {kind:<6} ")) && l.contains(" MIPS"));
    assert!(speed_line("interp"), "{doc}");
    assert_eq!(speed_line("kvm"), kvm_usable(), "{doc}");
    assert!(doc.lines().any(|l| l.starts_with("fastest picks ")), "{doc}");
}
