//! Guest instructions per second of the software CPU on fixed workloads: an ALU loop, the
//! `sieve` fixture, a memory copy loop, a call/return loop and a paging loop that stores to
//! 4096 pages after each CR3 reload.
//!
//! Throughput is in elements = instructions the interpreter retires per run, so criterion's
//! `Melem/s` is MIPS. Each machine is built once and reset between runs (images and start state
//! reloaded), so machine creation is not in the figure. The same guests run on KVM too where it
//! is available, with the same instruction count, so the two backends' speeds sit side by side.
//!
//! `cargo bench -p duet-benches --bench interp_speed`; figures in docs/BENCHMARKS.md.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use duet::{BackendKind, StopReason};
use duet_benches::workloads::speed_workloads;
use duet_benches::{backends, Rig};

fn interp_speed(c: &mut Criterion) {
    let mut group = c.benchmark_group("interp_speed");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    // `cargo test` runs each bench once as a smoke test: a twentieth of the work is enough there.
    let div = if duet_benches::test_mode() { 20 } else { 1 };
    for w in speed_workloads(div).expect("speed workloads") {
        let mut interp = Rig::new(BackendKind::Interp, &w.guest).expect("interpreter machine");
        let (outcome, retired) = interp.reset_and_run().expect("calibration run");
        assert_eq!(outcome.stop, StopReason::DebugExit { value: 0 }, "{} on the interpreter", w.name);
        let retired = retired.expect("the interpreter counts instructions");
        group.throughput(Throughput::Elements(retired));
        for kind in backends() {
            let mut rig = if kind == BackendKind::Interp {
                None
            } else {
                Some(Rig::new(kind, &w.guest).expect("machine"))
            };
            let rig = rig.as_mut().unwrap_or(&mut interp);
            group.bench_function(format!("{}/{kind}", w.name), |b| {
                b.iter(|| {
                    let (outcome, _) = rig.reset_and_run().expect("workload run");
                    assert_eq!(outcome.stop, StopReason::DebugExit { value: 0 }, "{} on {kind}", w.name);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, interp_speed);
criterion_main!(benches);
