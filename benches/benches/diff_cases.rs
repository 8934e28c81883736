//! Differential cases per second with VM reuse: one machine per backend, reset between cases
//! (`Vcpu::set_state` + `Guest::load_into`), each case run on every backend and the final
//! states compared.
//!
//! `alu-case`: a small fixed guest (nine ALU and flag instructions on seeded registers, a store,
//! the debug exit) with a new register seed per case, run through `Machine` directly.
//! `engine`: campaigns of the differential engine in src/fuzz/ (generated programs in all six
//! modes, `duet::fuzz::campaign::run`), with and without KVM. Throughput is in elements = cases. `alu-case/kvm+interp` is the differential
//! (both runs and the comparison); `alu-case/kvm` and `alu-case/interp` run one side alone. `cargo bench -p duet-benches --bench diff_cases`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use duet::core::{DiffMask, StateDiff};
use duet::StopReason;
use duet_benches::workloads::diff_case;
use duet_benches::{backends, Rig};

/// Cases per criterion iteration (each with its own seed).
const CASES: u64 = 16;

fn diff_cases(c: &mut Criterion) {
    let mut group = c.benchmark_group("diff_cases");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Elements(CASES));
    let kinds = backends();
    let cases: Vec<_> = (1..=CASES).map(|seed| diff_case(seed).expect("diff case")).collect();
    // The differential (every backend, states compared), then each backend alone for the split.
    let mut configs = vec![kinds.clone()];
    if kinds.len() > 1 {
        configs.extend(kinds.iter().map(|k| vec![*k]));
    }
    for config in configs {
        bench_config(&mut group, &config, &cases);
    }
    engine(&mut group, kinds.contains(&duet::BackendKind::Kvm));
    group.finish();
}

/// Cases per campaign of the differential engine.
const ENGINE_CASES: u64 = 200;

/// The differential engine (`duet::fuzz`): a campaign of generated programs in every mode, one
/// worker with its reused machines, no shrinking and nothing saved — the cases-per-second a
/// `duet fuzz` run sees, including its machine set-up once per campaign.
fn engine(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, kvm: bool) {
    use duet::fuzz::campaign::{self, Config};
    group.throughput(Throughput::Elements(ENGINE_CASES));
    let sides: &[bool] = if kvm { &[true, false] } else { &[false] };
    for &use_kvm in sides {
        let cfg = Config {
            cases: ENGINE_CASES,
            jobs: 1,
            use_kvm,
            shrink_budget: 0,
            per_signature: 0,
            ..Config::default()
        };
        let label = if use_kvm { "kvm+interp" } else { "interp" };
        group.bench_function(format!("engine/{label}"), |b| {
            b.iter(|| {
                let summary = campaign::run(&cfg, &mut |_| {}).expect("fuzz campaign");
                assert_eq!(summary.cases, ENGINE_CASES);
                summary.diverged
            })
        });
    }
}

fn bench_config(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    kinds: &[duet::BackendKind],
    cases: &[duet::Guest],
) {
    let mut rigs: Vec<Rig> = kinds.iter().map(|k| Rig::new(*k, &cases[0]).expect("machine")).collect();
    let label = kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join("+");
    group.bench_function(format!("alu-case/{label}"), |b| {
        b.iter(|| {
            let mut differing = 0;
            for case in cases {
                let mut outcomes = Vec::with_capacity(rigs.len());
                for rig in &mut rigs {
                    rig.guest.state = case.state.clone();
                    let (outcome, _) = rig.reset_and_run().expect("case run");
                    assert_eq!(outcome.stop, StopReason::DebugExit { value: 0 });
                    outcomes.push(outcome);
                }
                if let [l, r] = &outcomes[..] {
                    let mask = DiffMask {
                        rflags_undefined: l.undefined_rflags | r.undefined_rflags,
                        ignore_fpu: false,
                    };
                    if !StateDiff::states((l.backend, &l.state), (r.backend, &r.state), &mask).is_empty() {
                        differing += 1;
                    }
                }
            }
            differing
        })
    });
}

criterion_group!(benches, diff_cases);
criterion_main!(benches);
