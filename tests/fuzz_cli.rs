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

#[test]
fn diff_cli_record_rewrites_a_format_1_case_in_this_format_with_its_result() {
    // push-sp1: a real-mode PUSH with SP = 1 shuts the processor down (SDM Vol. 2B PUSH).
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/corpus/regressions/push-sp1-real-mode-shutdown.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let obj = json.as_object_mut().unwrap();
    obj.insert("format".into(), 1.into());
    obj.remove("expected");
    let dir = tmp("record");
    let file = dir.join("case.json");
    std::fs::write(&file, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let o = duet().args(["diff", "--record", "sdm"]).arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("recorded the sdm result (shutdown)"), "{stdout}");
    let case = duet::fuzz::Case::load(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(case.format, duet::fuzz::case::CASE_FORMAT);
    let e = case.expected.expect("a recorded result");
    assert_eq!((e.source, e.outcome.stop), (duet::fuzz::Source::Sdm, duet::StopReason::Shutdown));
    let o = duet().args(["diff", "--record", "qemu"]).arg(&file).output().unwrap();
    assert_eq!(o.status.code(), Some(ERROR), "only kvm and sdm are sources to record");
    std::fs::remove_dir_all(dir).ok();
}

/// Runs `duet fuzz` as `nobody` when this test runs as root (root may write anywhere), else as
/// this user; `None` where that cannot be done.
fn as_unprivileged(args: &[&str]) -> Option<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut cmd = duet();
    cmd.args(args);
    if root {
        cmd.uid(65534).gid(65534);
    }
    cmd.output().map_err(|e| eprintln!("skipped: cannot run duet as nobody: {e}")).ok()
}

#[test]
fn fuzz_cli_refuses_an_out_directory_it_cannot_write_before_any_case() {
    // A directory this user may not write in (mode 0555; as root, owned by root and the
    // campaign run as nobody).
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp("readonly");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let d = dir.to_str().unwrap();
    let args = ["fuzz", "--interp-only", "--cases", "20", "--mode", "long64", "--out", d];
    if let Some(o) = as_unprivileged(&args) {
        let (stdout, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(ERROR), "{stdout}{err}");
        assert!(err.starts_with(&format!("duet: error: {d}: Permission denied")), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!stdout.contains("cases"), "no case ran: {stdout}");
    }
    // A directory below a plain file cannot exist, for any user.
    let file = dir.parent().unwrap().join(format!("duet-fuzz-cli-{}-plain", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let out = file.join("out");
    let o = duet().args(["fuzz", "--interp-only", "--cases", "20", "--out"]).arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(ERROR), "{err}");
    assert!(err.starts_with(&format!("duet: error: {}: ", out.display())), "{err}");
    std::fs::remove_file(file).ok();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).ok();
    std::fs::remove_dir_all(dir).ok();
}

/// Starts an endless campaign, sends `signals` (one after the other) once it is under way, and
/// returns its output and the out directory.
fn interrupted(tag: &str, signals: &[&str], extra: &[&str]) -> (std::process::Output, std::path::PathBuf) {
    let parent = tmp(tag);
    // The campaign creates --out after installing its signal handlers: once the directory
    // exists, a signal is the campaign's to handle.
    let out = parent.join("out");
    let child = duet()
        .args(["fuzz", "--cases", "100000000", "--mode", "long64,real"])
        .args(extra)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut waited = 0;
    while !out.exists() && waited < 600 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        waited += 1;
    }
    // Let some cases run too.
    std::thread::sleep(std::time::Duration::from_millis(500));
    for signal in signals {
        let kill = Command::new("kill").args([*signal, &child.id().to_string()]).status().unwrap();
        assert!(kill.success());
    }
    (child.wait_with_output().unwrap(), out)
}

#[test]
fn fuzz_cli_sigint_finishes_the_case_in_flight_and_prints_the_summary() {
    // With KVM, agreeing cases are saved as they run (--keep-agreeing), so a stop mid-write
    // would show as a cut file; without it, the interpreter runs alone and saves nothing.
    let kvm = duet::BackendKind::Kvm.availability().is_available()
        && !std::env::var("DUET_BACKENDS").is_ok_and(|v| v == "interp");
    let extra: &[&str] = if kvm { &["--keep-agreeing", "100000000"] } else { &["--interp-only"] };
    if !kvm {
        eprintln!("kvm half skipped: KVM not usable or DUET_BACKENDS=interp: no case files to check");
    }
    for (tag, signal) in [("sigint", "-INT"), ("sigterm", "-TERM")] {
        let (o, out) = interrupted(tag, &[signal], extra);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(16), "{signal}: {stdout}{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("  interrupted  by SIGINT/SIGTERM after "), "{stdout}");
        let ran: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("  cases        ")?.split(' ').next()?.parse().ok())
            .unwrap_or(0);
        assert!(ran > 0, "{stdout}");
        if kvm {
            // Every case file is whole: each loads, and no temporary is left.
            let agree = out.join("agree");
            let files: Vec<_> = std::fs::read_dir(&agree).unwrap().map(|e| e.unwrap().path()).collect();
            assert!(!files.is_empty(), "{stdout}");
            for f in &files {
                assert_eq!(f.extension().and_then(|e| e.to_str()), Some("json"), "{}", f.display());
                duet::fuzz::Case::load(f).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        std::fs::remove_dir_all(out.parent().unwrap()).ok();
    }
}

/// The QEMU processes whose scratch directory names the process `pid` (duet-qemu's TempDir).
fn qemus_of(pid: u32) -> usize {
    let marker = format!("duet-qemu-{pid}-");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
                .filter(|c| String::from_utf8_lossy(c).contains(&marker))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn fuzz_cli_a_second_sigint_stops_at_once_and_leaves_no_qemu_behind() {
    // With --reference every case KVM cannot decide (every case, without KVM) asks QEMU, so the
    // case in flight after the first SIGINT takes a QEMU run: long enough for a second SIGINT,
    // sent once duet says it is finishing, to arrive first. A lost race (the summary came out
    // first) is retried; removing the second-signal path makes every attempt lose.
    if let duet::Availability::Unavailable(why) = duet::qemu::availability() {
        assert!(std::env::var("DUET_REQUIRE_QEMU").is_err(), "DUET_REQUIRE_QEMU is set: {why}");
        eprintln!("skipped: qemu: {why}");
        return;
    }
    use std::io::BufRead;
    for attempt in 0..5 {
        let out = tmp(&format!("sigint2-{attempt}")).join("out");
        let mut child = duet()
            .args(["fuzz", "--cases", "100000000", "--mode", "long64", "--reference", "--out"])
            .arg(&out)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let wait = std::time::Instant::now();
        while (!out.exists() || qemus_of(pid) == 0) && wait.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let int =
            || assert!(Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap().success());
        int();
        let notice = rx.iter().find(|l| l.contains("interrupted: finishing the cases in flight"));
        assert!(notice.is_some(), "no notice of the first SIGINT");
        int();
        let mut rest: Vec<String> = rx.iter().collect();
        let o = child.wait_with_output().unwrap();
        rest.push(String::from_utf8_lossy(&o.stderr).into());
        let stdout = String::from_utf8_lossy(&o.stdout);
        std::fs::remove_dir_all(out.parent().unwrap()).ok();
        assert_eq!(o.status.code(), Some(16), "{stdout}{}", rest.join("\n"));
        if stdout.contains("duet fuzz: seed") {
            eprintln!("attempt {attempt}: the summary came out before the second SIGINT: again");
            continue;
        }
        assert!(
            rest.iter().any(|l| l.contains("interrupted again: stopping at once")),
            "{}",
            rest.join("\n")
        );
        // The QEMU reference in flight ran in its own process group; it was killed, not orphaned.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(qemus_of(pid), 0, "a QEMU of the stopped campaign is still running");
        return;
    }
    panic!("in 5 attempts the second SIGINT never stopped the campaign before its summary");
}

#[test]
fn fuzz_cli_jobs_and_time_say_what_they_did() {
    let o = duet().args(["fuzz", "--interp-only", "--jobs", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(ERROR));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--jobs"), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp("jobs");
    let o = duet()
        .args(["fuzz", "--interp-only", "--cases", "8", "--mode", "long64", "--jobs", "100000", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let cores = std::thread::available_parallelism().unwrap().get();
    let note = format!("--jobs 100000 is more than the {cores} cores here: running {cores} workers");
    assert!(err.contains(&note), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
    // A time limit far shorter than the campaign: it stops and says so.
    let o = duet()
        .args(["fuzz", "--interp-only", "--cases", "100000000", "--mode", "long64", "--time", "0.5", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("  stopped      at the --time limit of 0.5 s: "), "{stdout}");
    assert!(stdout.contains(" of 100000000 cases ran"), "{stdout}");
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    std::fs::remove_dir_all(out).ok();
}
