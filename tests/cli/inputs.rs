//! Inputs a user controls: every read is bounded by what the input can be, refused in one line
//! beyond that, and options that would be ignored are refused.

use super::{duet, text, TempFile, ERROR};

/// The run failed with duet's error status and exactly one line on stderr containing `want`.
fn one_line_error(args: &[&str], want: &str) {
    let out = duet(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(ERROR), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("duet: error: ") && err.contains(want), "{args:?}: {err}");
}

#[test]
fn endless_inputs_are_refused_past_what_they_can_be() {
    // /dev/zero never ends: each reader stops one byte past its limit and says which.
    one_line_error(
        &["run", "--backend", "interp", "/dev/zero"],
        "image /dev/zero is larger than 32 MiB (the guest has 32 MiB of RAM; --mem sets it)",
    );
    one_line_error(
        &["run", "--backend", "interp", "--mem", "2M", "/dev/zero"],
        "larger than 2 MiB (the guest has 2 MiB of RAM",
    );
    one_line_error(
        &["run", "--backend", "interp", "--bios", "/dev/zero"],
        "firmware image /dev/zero is larger than 128 KiB (a ROM is 64 or 128 KiB)",
    );
    one_line_error(
        &["diff", "--interp-only", "/dev/zero"],
        "/dev/zero: not a duet case file: larger than 1024 KiB",
    );
}

#[test]
fn a_regular_file_larger_than_ram_is_refused_unread() {
    // A sparse 1 GiB file: refused from its size, without reading a byte of it.
    let big = TempFile::new("sparse", b"");
    std::fs::File::options().write(true).open(&big.0).unwrap().set_len(1 << 30).unwrap();
    one_line_error(&["run", "--backend", "interp", big.arg()], "is larger than 32 MiB");
}

#[test]
fn image_options_with_a_fixture_or_a_rom_are_refused() {
    for (opt, value) in [("--mode", "real"), ("--entry", "0x7c00"), ("--load-addr", "0x7c00")] {
        let out = duet(&["run", "--fixture", "alu", opt, value]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(ERROR), "{opt}: {err}");
        assert!(err.contains("cannot be used with") && err.contains(opt), "{opt}: {err}");
        let out = duet(&["run", "--bios", "/nonexistent.rom", opt, value]);
        assert_eq!(out.status.code(), Some(ERROR), "{opt}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("cannot be used with"), "{}", text(&out.stderr));
    }
}

#[test]
fn a_crafted_elf_program_header_offset_is_named_not_wrapped() {
    // ELF64 header (System V gABI) whose e_phoff points 16 bytes below 2^64.
    let mut f = vec![0u8; 64];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little-endian
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[32..40].copy_from_slice(&(u64::MAX - 15).to_le_bytes()); // e_phoff
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let elf = TempFile::new("phoff", &f);
    let out = duet(&["run", "--backend", "interp", elf.arg()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(ERROR), "{err}");
    assert!(err.contains("at offset 0xfffffffffffffff0) lies outside the file (64 bytes)"), "{err}");
    assert!(!err.contains("18446744073709551"), "{err}");
}

#[test]
fn diff_checks_every_file_and_reports_each_bad_one() {
    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/corpus/regressions/rf-in-fault-frame.json");
    let good = good.to_str().unwrap();
    let bad = TempFile::new("bad-case", b"{ not json");
    let out = duet(&["diff", "--interp-only", good, bad.arg(), "/nonexistent/c.json", good]);
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    // Both good files were checked, before and after the bad ones.
    assert_eq!(stdout.matches("interp matches the recorded kvm result").count(), 2, "{stdout}");
    assert!(err.contains(&format!("duet: error: {}: not a duet case file", bad.arg())), "{err}");
    assert!(err.contains("duet: error: /nonexistent/c.json: "), "{err}");
    assert!(err.contains("2 of 4 files could not be checked"), "{err}");
    assert_eq!(out.status.code(), Some(ERROR), "{err}");
}
