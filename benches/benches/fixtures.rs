//! Whole-guest runs of fixtures on every available backend: machine creation, run, teardown.
//!
//! `cargo bench -p duet-benches --bench fixtures`; figures go in docs/BENCHMARKS.md.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use duet::{run_guest, testing, RunConfig};

fn fixtures(c: &mut Criterion) {
    let config = RunConfig { timeout: Duration::from_secs(30), ..RunConfig::default() };
    let mut group = c.benchmark_group("fixture");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for name in ["pio-loop", "sieve"] {
        let Some(fixture) = duet::fixtures::find(name) else { continue };
        let Ok(guest) = fixture.guest() else { continue };
        for kind in testing::select_backends() {
            let backend = kind.create();
            // Instructions retired on this backend (where it counts them) make the throughput.
            if let Ok(r) = run_guest(&*backend, &guest, &config) {
                if let Some(n) = r.outcome.instructions {
                    group.throughput(Throughput::Elements(n));
                }
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
