//! One guest exit round trip — port out, port in, MMIO read, MMIO write, HLT-and-resume — on
//! each backend, and on a raw kvm-ioctls loop with no duet layer (`raw_kvm`), in one run.
//!
//! Each exit guest loops `l: <exit>; dec ecx; jnz l` and ends with the debug exit; the host puts
//! criterion's iteration count in ECX, so the reported time is per exit (plus the two loop
//! instructions, the same on every side). duet runs the I/O guests through `Machine::run` with
//! the standard devices, as any user does. `loop-only` runs the same loop with a `nop` instead
//! of an exit: its time is the loop's own cost on each side, to subtract from the others.
//!
//! HLT-and-resume: the guest halts with IF = 1 and the host wakes it by injecting an interrupt
//! whose handler is `iret` (a halted CPU resumes only on an interrupt; `Machine::run` ends a run
//! at a HLT nothing can wake). duet drives it the way `Machine::run`'s loop does — `Vcpu::run`,
//! `ready_for_interrupt`, `inject_interrupt`, with the run's deadline set — and the raw loop
//! with KVM_RUN and KVM_INTERRUPT.
//!
//! `cargo bench -p duet-benches --bench exit_latency`; figures in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use duet::{BackendKind, StopReason};
use duet_benches::raw_kvm::RawKvm;
use duet_benches::workloads::{exit_guest, ExitKind};
use duet_benches::{backends, vcpu_batch, Rig};

/// Most exits one batch can take (ECX is the loop counter).
const MAX_BATCH: u64 = u32::MAX as u64;

fn exit_latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("exit_latency");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let kinds = backends();
    for kind in ExitKind::ALL {
        let name = kind.name();
        if kinds.contains(&BackendKind::Kvm) {
            let mut raw = RawKvm::new(kind).expect("raw KVM VM for an exit guest");
            group.bench_function(format!("{name}/raw_kvm"), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    let seen = raw.run_batch(iters.min(MAX_BATCH)).expect("raw exit loop");
                    let elapsed = t.elapsed();
                    let expected = if kind == ExitKind::LoopOnly { 0 } else { iters.min(MAX_BATCH) };
                    assert_eq!(seen, expected, "one exit per iteration");
                    elapsed
                })
            });
        }
        let guest = exit_guest(kind).expect("exit guest");
        for backend in &kinds {
            let mut rig = Rig::new(*backend, &guest).expect("machine for an exit guest");
            let mut regs = guest.state.regs;
            group.bench_function(format!("{name}/{backend}"), |b| {
                b.iter_custom(|iters| {
                    regs.rcx = iters.min(MAX_BATCH);
                    rig.machine.vcpu().set_regs(&regs).expect("set regs");
                    if kind == ExitKind::Hlt {
                        let t = Instant::now();
                        let halts = vcpu_batch(&mut **rig.machine.vcpu(), true).expect("HLT loop");
                        let elapsed = t.elapsed();
                        assert_eq!(halts, iters.min(MAX_BATCH), "{backend}: one HLT per iteration");
                        return elapsed;
                    }
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
