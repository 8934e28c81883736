//! `duet fuzz` and `duet diff` from the command line: summaries, exit status, one-line errors.

use std::process::Command;

/// duet's own error status (`duet --help`: its outcomes are even, a guest's debug exit odd).
const ERROR: i32 = 4;

fn duet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duet"))
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("duet-fuzz-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn fuzz_cli_interp_only_prints_a_summary_and_exits_zero() {
    let out = tmp("interp");
    let o = duet()
        .args(["fuzz", "--interp-only", "--cases", "30", "--mode", "long,real", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("cases        30"), "{stdout}");
    assert!(stdout.contains("interp only"), "{stdout}");
    std::fs::remove_dir_all(out).ok();
}

#[test]
fn fuzz_cli_rejects_bad_shards_and_modes_in_one_line() {
    let o = duet().args(["fuzz", "--shard", "3/3"]).output().unwrap();
    assert_eq!(o.status.code(), Some(ERROR));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shard `3/3`"));
    let o = duet().args(["fuzz", "--mode", "vm86"]).output().unwrap();
    assert_eq!(o.status.code(), Some(ERROR));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown mode `vm86`"));
}

#[test]
fn diff_cli_names_the_file_and_field_of_a_malformed_case() {
    let dir = tmp("bad");
    let path = dir.join("bad.json");
    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/corpus/regressions/rf-in-fault-frame.json");
    let text = std::fs::read_to_string(good).unwrap().replace("\"code\": \"", "\"code\": \"zz");
    std::fs::write(&path, text).unwrap();
    let o = duet().arg("diff").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(ERROR), "{err}");
    assert!(err.contains("bad.json") && err.contains("field `code`"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn diff_cli_replays_a_corpus_case_against_its_recorded_result() {
    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/corpus/regressions/rf-in-fault-frame.json");
    let o = duet().args(["diff", "--interp-only"]).arg(&good).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}");
    assert!(stdout.contains("interp matches the recorded kvm result"), "{stdout}");
}
