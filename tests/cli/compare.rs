//! `--backend both`: what is compared, what is not a result, how long the table gets, and the
//! console streamed whole however much the guest prints.

use super::{duet, kvm_skip, text, TempFile};

/// Runs a flat image of `code` in `mode` on both backends: (status, stdout, stderr).
fn both(tag: &str, mode: &str, code: &[u8], extra: &[&str]) -> (Option<i32>, String, String) {
    let img = TempFile::new(tag, code);
    let mut args = vec!["run", "--backend", "both", "--mode", mode];
    args.extend_from_slice(extra);
    args.push(img.arg());
    let out = duet(&args);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn both_deadlines_are_no_result_not_a_difference() {
    if let Some(why) = kvm_skip() {
        eprintln!("skipped: kvm: {why}");
        return;
    }
    // jmp $ on both: each reaches the deadline with whatever state it had then.
    let (code, out, err) = both("both-spin", "real", &[0xeb, 0xfe], &["--timeout", "0.3"]);
    assert!(out.starts_with("no comparable result from kvm and interp: "), "{out}");
    assert!(out.contains("  kvm:    deadline reached\n  interp: deadline reached\n"), "{out}");
    assert!(!out.contains("field"), "no table: {out}");
    assert_eq!(code, Some(10), "{out}{err}");
}

#[test]
fn both_unrunnable_on_kvm_and_unfetchable_on_interp_is_no_comparison() {
    if let Some(why) = kvm_skip() {
        eprintln!("skipped: kvm: {why}");
        return;
    }
    // mov eax, 0x40000000 ; jmp eax: no RAM there for either CPU to fetch from.
    let code = [0xb8, 0x00, 0x00, 0x00, 0x40, 0xff, 0xe0];
    let (status, out, err) = both("both-unbacked", "protected", &code, &[]);
    assert!(out.starts_with("no comparable result from kvm and interp"), "{out}");
    assert!(out.contains("  kvm:    the hardware backend cannot run this"), "{out}");
    assert!(out.contains("  interp: instruction fetch from unbacked address 0x40000000"), "{out}");
    assert_eq!(status, Some(22), "{out}{err}");
}

#[test]
fn both_triple_faults_compare_memory_not_the_registers_left_behind() {
    if let Some(why) = kvm_skip() {
        eprintln!("skipped: kvm: {why}");
        return;
    }
    // lidt [0x100010] (zero limit) ; ud2 → #UD, #GP, #DF find no gate: shutdown (SDM Vol. 3A
    // §6.14.4). What RFLAGS.RF and the rest hold afterwards is no result.
    let mut code = vec![0x0f, 0x01, 0x1d, 0x10, 0x00, 0x10, 0x00, 0x0f, 0x0b];
    code.resize(0x16, 0);
    let (status, out, err) = both("both-triple", "protected", &code, &[]);
    assert!(out.starts_with("every run shut down (triple fault) with the same memory and console"), "{out}");
    assert!(!out.contains("rflags"), "{out}");
    assert_eq!(status, Some(8), "{out}{err}");
}

#[test]
fn both_memory_table_shows_40_rows_and_counts_the_rest() {
    if let Some(why) = kvm_skip() {
        eprintln!("skipped: kvm: {why}");
        return;
    }
    // rdtsc ; mov edi, 0x200000 ; mov ecx, 0x40000 ; rep stosd ; cli ; hlt — 1 MiB filled with
    // the time-stamp counter, which differs between two runs: 131,072 differing 8-byte words.
    let code = [0x0f, 0x31, 0xbf, 0, 0, 0x20, 0, 0xb9, 0, 0, 4, 0, 0xf3, 0xab, 0xfa, 0xf4];
    let words = (1u64 << 20) / 8;
    let (status, out, _) = both("both-tsc", "protected", &code, &[]);
    assert_eq!(status, Some(2), "{out}");
    let table_rows = out.lines().skip(2).take_while(|l| !l.starts_with('…')).count();
    let shown = out.matches("mem[").count() as u64;
    assert_eq!(table_rows, 40, "{out}");
    let more = format!("… and {} more differing memory words (--all-rows prints every row)", words - shown);
    assert!(out.contains(&more), "{out}");
    // --all-rows: every word, nothing lost.
    let (status, out, _) = both("both-tsc-all", "protected", &code, &["--all-rows"]);
    assert_eq!(status, Some(2));
    assert_eq!(out.matches("mem[").count() as u64, words);
    assert!(!out.contains("more differing"));
}

#[test]
fn console_output_beyond_the_kept_tail_is_streamed_whole() {
    // mov ecx, N ; xor eax, eax ; mov dx, 0xe9 ; l: out dx, al ; inc al ; loop l ; cli ; hlt
    // prints bytes 0, 1, …, 255, 0, … : N of them, more than the 1 MiB a console keeps.
    let n: u32 = (1 << 20) + (1 << 18);
    let mut code = vec![0xb9];
    code.extend_from_slice(&n.to_le_bytes());
    code.extend_from_slice(&[0x31, 0xc0, 0x66, 0xba, 0xe9, 0x00, 0xee, 0xfe, 0xc0, 0xe2, 0xfb, 0xfa, 0xf4]);
    let img = TempFile::new("stream", &code);
    let out = duet(&["run", "--backend", "interp", "--mode", "protected", "--timeout", "120", img.arg()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut want: Vec<u8> = (0..n).map(|i| i as u8).collect();
    want.push(b'\n'); // the CLI ends output that does not end in a newline
    assert_eq!(out.stdout.len(), want.len());
    assert!(out.stdout == want, "the streamed output differs from what the guest printed");
}

#[test]
fn a_prompt_without_a_newline_shows_while_the_guest_still_runs() {
    use std::io::Read;
    // A line, then a prompt, then a guest that computes until the deadline: mov al,'a' ; out
    // 0xe9,al ; mov al,0Ah ; out 0xe9,al ; mov al,'>' ; out 0xe9,al ; jmp $ (hand-encoded: B0 ib,
    // E6 ib, EB FE). stdout writes at newlines, and the first write is flushed at once; the
    // prompt, a few instructions later, has no newline.
    let code = [0xb0, b'a', 0xe6, 0xe9, 0xb0, b'\n', 0xe6, 0xe9, 0xb0, b'>', 0xe6, 0xe9, 0xeb, 0xfe];
    let img = TempFile::new("prompt", &code);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["run", "--backend", "interp", "--mode", "real", "--timeout", "3600", img.arg()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the duet binary runs");
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = [0u8; 3];
        let _ = tx.send(stdout.read_exact(&mut got).map(|()| got));
    });
    // The guest runs for an hour; the prompt must come long before (a watchdog, not a measure:
    // it shows within ECHO_FLUSH_INTERVAL, and without the flusher only when the run ends).
    let got = rx.recv_timeout(std::time::Duration::from_secs(120));
    let running = matches!(child.try_wait(), Ok(None));
    child.kill().ok();
    child.wait().ok();
    assert!(running, "the run ended early");
    match got {
        Ok(Ok(bytes)) => assert_eq!(&bytes, b"a\n>"),
        other => panic!("the prompt did not show while the guest ran: {other:?}"),
    }
}
