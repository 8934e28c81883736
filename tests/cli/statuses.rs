//! Exit statuses: a guest's debug exit is odd, each outcome of duet's own a distinct even number,
//! and the end line names the status the process really returns.

use super::{duet, kvm_skip, text, TempFile, ERROR};

/// Runs a flat image of `code` in `mode` on `backend`: (status, stdout, stderr).
fn run_image(
    tag: &str,
    backend: &str,
    mode: &str,
    code: &[u8],
    extra: &[&str],
) -> (Option<i32>, String, String) {
    let img = TempFile::new(tag, code);
    let mut args = vec!["run", "--backend", backend, "--mode", mode];
    args.extend_from_slice(extra);
    args.push(img.arg());
    let out = duet(&args);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn statuses_are_tabled_in_help_and_even_for_duet_and_odd_for_the_guest() {
    let help = text(&duet(&["run", "--help"]).stdout);
    for line in
        ["  0  the guest halted", "  2  the runs differ", "  4  duet's own error", "  16  interrupted"]
    {
        assert!(help.contains(line), "`duet run --help` lacks {line:?}:\n{help}");
    }
    assert!(help.contains("values above 0x7F wrap (0x80 exits with 1)"), "{help}");
    assert!(text(&duet(&["--help"]).stdout).contains("  20  halted with interrupts enabled"));
    // A usage error is duet's error (clap's own 2 would read as "difference").
    let out = duet(&["run", "--no-such-option"]);
    assert_eq!(out.status.code(), Some(ERROR), "{}", text(&out.stderr));
    // `--help` itself succeeds.
    assert_eq!(duet(&["run", "--help"]).status.code(), Some(0));
}

#[test]
fn debug_exit_0x80_wraps_to_1_and_the_end_line_says_1() {
    // mov al, 0x80 ; out 0xf4, al (SDM Vol. 2: B0 ib, E6 ib). QEMU isa-debug-exit: exit(0x101),
    // which the kernel cuts to 8 bits: 1.
    let (code, _, err) = run_image("dx80", "interp", "real", &[0xb0, 0x80, 0xe6, 0xf4], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("[interp] debug exit 0x80 (exit code 1)"), "{err}");
    assert!(!err.contains("257"), "{err}");
}

#[test]
fn a_fixture_that_exits_with_value_0_is_not_mistaken_for_an_error() {
    // sieve writes 0 to the debug-exit port when its count is right: status 1, which no
    // outcome of duet's own uses any more.
    let out = duet(&["run", "--backend", "interp", "--fixture", "sieve"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1229 primes"), "{}", text(&out.stdout));
    assert_eq!(duet(&["run", "--fixture", "no-such-fixture"]).status.code(), Some(ERROR));
}

#[test]
fn each_outcome_has_its_own_status_on_the_software_cpu() {
    // fault-real divides by zero; the builder's IVT stub reports #DE.
    let out = duet(&["run", "--backend", "interp", "--fixture", "fault-real"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    // lidt [0x100010] (a zero limit) ; ud2: #UD finds no gate, #GP neither, #DF neither:
    // shutdown (SDM Vol. 3A §6.14.4, Table 6-5).
    let mut tf = vec![0x0f, 0x01, 0x1d, 0x10, 0x00, 0x10, 0x00, 0x0f, 0x0b];
    tf.resize(0x16, 0);
    let (code, _, err) = run_image("triple", "interp", "protected", &tf, &[]);
    assert_eq!(code, Some(8), "{err}");
    assert!(err.contains("[interp] shutdown (triple fault)"), "{err}");
    // jmp $ never ends.
    let (code, _, err) = run_image("spin", "interp", "real", &[0xeb, 0xfe], &["--timeout", "0.2"]);
    assert_eq!(code, Some(10), "{err}");
    // FNINIT: x87 is not implemented by the software CPU.
    let (code, _, err) = run_image("x87", "interp", "real", &[0xdb, 0xe3, 0xf4], &[]);
    assert_eq!(code, Some(12), "{err}");
    assert!(err.contains("unsupported instruction `fninit`"), "{err}");
}

#[test]
fn sti_hlt_without_an_interrupt_source_is_said_on_both_backends() {
    // sti ; hlt — a guest waiting for a timer tick duet does not have yet.
    let mut backends = vec!["interp"];
    match kvm_skip() {
        None => backends.push("kvm"),
        Some(why) => eprintln!("kvm half skipped: {why}"),
    }
    for backend in backends {
        let (code, _, err) = run_image(&format!("stihlt-{backend}"), backend, "real", &[0xfb, 0xf4], &[]);
        assert!(
            err.contains(&format!("[{backend}] halted with interrupts enabled and no interrupt source")),
            "{err}"
        );
        assert_eq!(code, Some(20), "{err}");
    }
    // cli ; hlt is the plain end.
    let (code, _, err) = run_image("clihlt", "interp", "real", &[0xfa, 0xf4], &[]);
    assert!(err.contains("[interp] halted,"), "{err}");
    assert_eq!(code, Some(0));
}

#[test]
fn an_instruction_fetch_from_no_ram_is_its_own_outcome_on_the_software_cpu_and_kvm_cannot_run_it() {
    // mov eax, 0x40000000 ; jmp eax — 1 GiB is far above the 32 MiB of RAM: nothing to fetch.
    let code = [0xb8, 0x00, 0x00, 0x00, 0x40, 0xff, 0xe0];
    let (status, _, err) = run_image("unbacked", "interp", "protected", &code, &[]);
    assert!(
        err.contains("[interp] instruction fetch from unbacked address 0x40000000 (no RAM there)"),
        "{err}"
    );
    assert!(!err.contains("unsupported"), "{err}");
    assert_eq!(status, Some(18), "{err}");
    match kvm_skip() {
        Some(why) => eprintln!("skipped: kvm: {why}"),
        None => {
            // KVM's instruction emulator has no bytes to decode there: an emulation failure.
            let (status, _, err) = run_image("unbacked-kvm", "kvm", "protected", &code, &[]);
            assert!(err.contains("[kvm] the hardware backend cannot run this"), "{err}");
            assert!(err.contains("at rip 0x40000000"), "{err}");
            assert_eq!(status, Some(14), "{err}");
        }
    }
}
