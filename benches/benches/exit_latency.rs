//! One guest exit round trip — port out, port in, MMIO read, MMIO write, HLT-and-resume — on
//! each backend, and on a raw kvm-ioctls loop with no duet layer (`raw_kvm`), in one run.
//!
//! Each exit guest loops `l: <exit>; dec ecx; jnz l` and ends with the debug exit; the host puts
//! criterion's iteration count in ECX, so the reported time is per exit (plus two guest
//! instructions, the same on every side). duet runs it through `Machine::run` with the standard
//! devices, as any user does. HLT ends `Machine::run` (nothing can wake the vCPU), so `hlt` is
//! one `Machine::run` per HLT; `hlt-vcpu` is one bare `Vcpu::run` per HLT.
//!
//! `cargo bench -p duet-benches --bench exit_latency`; figures in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use duet::{BackendKind, StopReason, VcpuExit};
use duet_benches::raw_kvm::RawKvm;
use duet_benches::workloads::{exit_guest, ExitKind};
use duet_benches::{backends, Rig};

/// ECX for the HLT loops, which are resumed one HLT at a time and never reach their end.
const FOREVER: u64 = u32::MAX as u64;

fn exit_latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("exit_latency");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let kinds = backends();
    for kind in ExitKind::ALL {
        let name = kind.name();
        if kinds.contains(&BackendKind::Kvm) {
            let mut raw = RawKvm::new(kind).expect("raw KVM VM for an exit guest");
            if kind == ExitKind::Hlt {
                raw.start(FOREVER).expect("start the HLT loop");
                group.bench_function(format!("{name}/raw_kvm"), |b| {
                    b.iter(|| raw.run_once().expect("KVM_RUN to the next HLT"))
                });
            } else {
                group.bench_function(format!("{name}/raw_kvm"), |b| {
                    b.iter_custom(|iters| {
                        let t = Instant::now();
                        let seen = raw.run_batch(iters.min(FOREVER)).expect("raw exit loop");
                        let elapsed = t.elapsed();
                        assert_eq!(seen, iters.min(FOREVER), "one exit per iteration");
                        elapsed
                    })
                });
            }
        }
        let guest = exit_guest(kind).expect("exit guest");
        for backend in &kinds {
            let mut rig = Rig::new(*backend, &guest).expect("machine for an exit guest");
            let mut regs = guest.state.regs.clone();
            if kind == ExitKind::Hlt {
                regs.rcx = FOREVER;
                rig.machine.vcpu().set_regs(&regs).expect("set regs");
                group.bench_function(format!("{name}/{backend}"), |b| {
                    b.iter(|| {
                        let outcome = rig.run().expect("run to the next HLT");
                        assert_eq!(outcome.stop, StopReason::Halted);
                    })
                });
                group.bench_function(format!("hlt-vcpu/{backend}"), |b| {
                    b.iter(|| {
                        let exit = rig.machine.vcpu().run().expect("Vcpu::run to the next HLT");
                        assert!(matches!(exit, VcpuExit::Hlt), "{exit:?}");
                    })
                });
                continue;
            }
            group.bench_function(format!("{name}/{backend}"), |b| {
                b.iter_custom(|iters| {
                    regs.rcx = iters.min(FOREVER);
                    rig.machine.vcpu().set_regs(&regs).expect("set regs");
                    let t = Instant::now();
                    let outcome = black_box(rig.run().expect("exit loop"));
                    let elapsed = t.elapsed();
                    assert_eq!(outcome.stop, StopReason::DebugExit { value: 0 }, "{backend}");
                    elapsed
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, exit_latency);
criterion_main!(benches);
