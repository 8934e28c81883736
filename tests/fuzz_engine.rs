//! The differential engine itself: deterministic generation, sharding, case files, and a small
//! campaign on every available backend.

use std::collections::BTreeSet;
use std::time::Duration;

use duet::fuzz::campaign::{self, case_number, Config};
use duet::fuzz::{Case, Expected, FuzzError, FuzzMode, Outcome};
use duet::StopReason;

fn small(mode: FuzzMode, cases: u64) -> Config {
    Config { modes: vec![mode], cases, seed: 7, timeout: Duration::from_secs(2), ..Config::default() }
}

#[test]
fn fuzz_cases_are_deterministic_per_seed_and_index() {
    let cfg = Config { seed: 42, ..Config::default() };
    for k in [0, 1, 17, 999] {
        assert_eq!(case_number(&cfg, k).unwrap(), case_number(&cfg, k).unwrap());
    }
    let other = Config { seed: 43, ..Config::default() };
    assert_ne!(case_number(&cfg, 5).unwrap(), case_number(&other, 5).unwrap());
}

#[test]
fn fuzz_shards_partition_the_campaign() {
    // Case k belongs to shard k mod N: the shards together run every case exactly once.
    let mut all = BTreeSet::new();
    for shard in 0..3 {
        let cfg = Config { shard: (shard, 3), use_kvm: false, ..small(FuzzMode::Long64, 10) };
        let s = campaign::run(&cfg, &mut |_| {}).unwrap();
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        all.insert((shard, s.cases));
    }
    let total: u64 = all.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 10);
    assert!(campaign::run(&Config { shard: (3, 3), ..small(FuzzMode::Long64, 1) }, &mut |_| {}).is_err());
}

#[test]
fn fuzz_campaign_runs_every_mode_without_harness_errors() {
    for mode in FuzzMode::ALL {
        let use_kvm = duet::testing::select_backends().contains(&duet::BackendKind::Kvm);
        let cfg = Config { use_kvm, per_signature: 0, ..small(mode, 12) };
        let s = campaign::run(&cfg, &mut |_| {}).unwrap();
        assert!(s.errors.is_empty(), "{mode}: {:?}", s.errors);
        assert_eq!(s.cases, 12, "{mode}");
        let counted = s.agree
            + s.diverged
            + s.undecided.values().sum::<u64>()
            + s.unsupported.values().sum::<u64>()
            + s.hung
            + s.interp_only;
        assert_eq!(counted, s.cases, "{mode}: every case is counted once: {s:?}");
    }
}

#[test]
fn fuzz_case_files_round_trip_and_malformed_ones_name_file_and_field() {
    let dir = std::env::temp_dir().join(format!("duet-fuzz-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let case = case_number(&Config::default(), 3).unwrap();
    let path = dir.join("c.json");
    case.save(&path).unwrap();
    assert_eq!(Case::load(&path).unwrap(), case);

    let mut bad = case.clone();
    bad.regs.insert("rax".into(), "0xzz".into());
    bad.save(&path).unwrap();
    match Case::load(&path) {
        Err(FuzzError::CaseField { file, field, .. }) => {
            assert!(file.ends_with("c.json"));
            assert_eq!(field, "regs.rax");
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(&path, "{\"format\": 1}").unwrap();
    let e = Case::load(&path).unwrap_err().to_string();
    assert!(e.contains("c.json") && e.contains("mode"), "{e}");

    // A recorded result whose stop is not one is refused when the file is loaded.
    let mut recorded = case.clone();
    recorded.expected = Some(Expected::recorded_here(Outcome::stopped(StopReason::Halted)));
    let text = serde_json::to_string_pretty(&recorded).unwrap().replace("\"halted\"", "\"exploded\"");
    std::fs::write(&path, text).unwrap();
    let e = Case::load(&path).unwrap_err().to_string();
    assert!(e.ends_with("c.json: field `expected.outcome.stop` is `exploded`, not a stop (`debug-exit V`, `exception #XX error E at RIP`, `halted`, `shutdown`, `deadline` or `debug single-step at RIP`)"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
