//! Whole-guest runs of fixtures on every available backend: machine creation, run, teardown.
//!
//! Throughput is in elements = instructions the interpreter retires for the fixture (the same
//! guest retires the same instructions on KVM, which does not count them), so every backend's
//! `elem/s` is guest instructions per second including startup.
//!
//! `cargo bench -p duet-benches --bench fixtures`; figures go in docs/BENCHMARKS.md.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use duet::{run_guest, testing, BackendKind, RunConfig};

fn fixtures(c: &mut Criterion) {
    let config = RunConfig { timeout: Duration::from_secs(30), ..RunConfig::default() };
    let mut group = c.benchmark_group("fixture");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for name in ["pio-loop", "sieve"] {
        let Some(fixture) = duet::fixtures::find(name) else { continue };
        let Ok(guest) = fixture.guest() else { continue };
        let interp = BackendKind::Interp.create();
        let counted = run_guest(&*interp, &guest, &config).ok().and_then(|r| r.outcome.instructions);
        for kind in testing::select_backends() {
            let backend = kind.create();
            if let Some(n) = counted {
                group.throughput(Throughput::Elements(n));
            }
            group.bench_function(format!("{name}/{kind}"), |b| {
                b.iter(|| run_guest(&*backend, &guest, &config).map(|r| r.outcome.exits))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, fixtures);
criterion_main!(benches);
