//! `duet-exit-ratio [rounds] [exits]`: duet's KVM exit round trip against the raw kvm-ioctls
//! loop, interleaved batch by batch so that load from other processes on a shared host falls
//! on both sides alike, and the interpreter's round trip beside them.
//!
//! For each exit kind, every round runs one batch of `exits` exits (default 2000) on each of:
//! `raw` (bare kvm-ioctls loop), `vcpu` (duet's `Vcpu` API over KVM, no deadline), `vcpu+dl`
//! (the same with the deadline every `Machine::run` sets), `machine` (`Machine::run` with the
//! standard devices; for HLT, the `Vcpu` loop with a deadline, since `Machine::run` ends at a
//! HLT), and `interp` (`Machine::run` on the interpreter). It prints the median time per exit
//! of each and the median of the per-round ratios. The exit_latency criterion bench measures
//! the same loops one after another; this tool is for the ratios.

use std::process::ExitCode;
use std::time::Instant;

use duet::{BackendKind, StopReason};
use duet_benches::raw_kvm::RawKvm;
use duet_benches::workloads::{exit_guest, ExitKind};
use duet_benches::{vcpu_batch, Rig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Nanoseconds per exit of one batch.
fn per_exit(exits: u64, f: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_nanos() as f64 / exits as f64)
}

fn run(rounds: usize, exits: u64) -> Result<(), String> {
    println!("{rounds} rounds of {exits} exits; ns per exit (median over rounds), ratios are medians of per-round ratios");
    println!(
        "{:<11} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} {:>11}",
        "kind",
        "raw",
        "vcpu",
        "vcpu+dl",
        "machine",
        "interp",
        "vcpu/raw",
        "vcpu+dl/r",
        "machine/r",
        "machine/int"
    );
    for kind in ExitKind::ALL {
        let guest = exit_guest(kind).map_err(|e| e.to_string())?;
        let mut raw = RawKvm::new(kind)?;
        let mut kvm = Rig::new(BackendKind::Kvm, &guest)?;
        let mut interp = Rig::new(BackendKind::Interp, &guest)?;
        let mut regs = guest.state.regs;
        regs.rcx = exits;
        let machine_batch = |rig: &mut Rig| -> Result<(), String> {
            rig.machine.vcpu().set_regs(&regs).map_err(|e| e.to_string())?;
            if kind == ExitKind::Hlt {
                return vcpu_batch(&mut **rig.machine.vcpu(), true).map(drop);
            }
            let outcome = rig.run().map_err(|e| e.to_string())?;
            match outcome.stop {
                StopReason::DebugExit { value: 0 } => Ok(()),
                other => Err(format!("the exit loop ended with {other}")),
            }
        };
        let vcpu_only = |rig: &mut Rig, deadline: bool| -> Result<(), String> {
            rig.machine.vcpu().set_regs(&regs).map_err(|e| e.to_string())?;
            vcpu_batch(&mut **rig.machine.vcpu(), deadline).map(drop)
        };
        // One warm-up round, not recorded.
        raw.run_batch(exits)?;
        vcpu_only(&mut kvm, false)?;
        machine_batch(&mut kvm)?;
        machine_batch(&mut interp)?;
        let mut t: [Vec<f64>; 5] = Default::default();
        let mut r: [Vec<f64>; 4] = Default::default();
        for _ in 0..rounds {
            let raw_t = per_exit(exits, || raw.run_batch(exits).map(drop))?;
            let vcpu_t = per_exit(exits, || vcpu_only(&mut kvm, false))?;
            let dl_t = per_exit(exits, || vcpu_only(&mut kvm, true))?;
            let machine_t = per_exit(exits, || machine_batch(&mut kvm))?;
            let interp_t = per_exit(exits, || machine_batch(&mut interp))?;
            for (v, x) in t.iter_mut().zip([raw_t, vcpu_t, dl_t, machine_t, interp_t]) {
                v.push(x);
            }
            for (v, x) in
                r.iter_mut().zip([vcpu_t / raw_t, dl_t / raw_t, machine_t / raw_t, machine_t / interp_t])
            {
                v.push(x);
            }
        }
        let [t0, t1, t2, t3, t4] = t.map(median);
        let [r0, r1, r2, r3] = r.map(median);
        println!(
            "{:<11} {t0:>9.0} {t1:>9.0} {t2:>9.0} {t3:>9.0} {t4:>9.0} | {r0:>9.3} {r1:>9.3} {r2:>9.3} {r3:>11.1}",
            kind.name()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, default: u64| -> Result<u64, String> {
        args.get(i).map_or(Ok(default), |s| s.parse().map_err(|_| format!("`{s}` is not a number")))
    };
    let result = num(0, 15).and_then(|rounds| Ok((rounds, num(1, 2000)?))).and_then(|(rounds, exits)| {
        if exits == 0 || exits > u64::from(u32::MAX) {
            return Err("exits must be between 1 and 2^32 - 1".into());
        }
        run(rounds as usize, exits)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duet-exit-ratio: {e}");
            ExitCode::FAILURE
        }
    }
}
