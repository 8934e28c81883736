//! Startup: create a machine (memory, VM and vCPU, standard devices), load a guest and reach its
//! first exit, per backend. The guest's first instruction is the debug exit.
//!
//! The guest is assembled once, outside the measurement; tearing the machine down is outside
//! it too (`iter_with_large_drop`). `cargo bench -p duet-benches --bench startup`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use duet::StopReason;
use duet_benches::workloads::first_exit;
use duet_benches::{backends, Rig};

fn startup(c: &mut Criterion) {
    let mut group = c.benchmark_group("startup");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let guest = first_exit().expect("first-exit guest");
    // The CPUID profile is computed once per process (it asks KVM); keep that out of the figure.
    let _ = duet::shared_cpuid_profile();
    for kind in backends() {
        group.bench_function(format!("first-exit/{kind}"), |b| {
            b.iter_with_large_drop(|| {
                let mut rig = Rig::new(kind, &guest).expect("machine");
                let outcome = rig.run().expect("run to the first exit");
                assert_eq!(outcome.stop, StopReason::DebugExit { value: 0 });
                rig
            })
        });
    }
    group.finish();
}

criterion_group!(benches, startup);
criterion_main!(benches);
