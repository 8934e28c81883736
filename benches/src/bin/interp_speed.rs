//! `duet-interp-speed <alu|sieve|copy|call-ret|paging> [runs]`: runs one interp_speed workload
//! on the interpreter `runs` times (default 5) and prints instructions and MIPS per run.
//!
//! The same guests as the interp_speed bench, without criterion: a quick check while optimising
//! the interpreter, and a clean target for a profiler
//! (`valgrind --tool=callgrind target/release/duet-interp-speed sieve 3`).

use std::process::ExitCode;

use duet::{BackendKind, StopReason};
use duet_benches::workloads::speed_workloads;
use duet_benches::Rig;

fn run(name: &str, runs: u32) -> Result<(), String> {
    let workloads = speed_workloads(1).map_err(|e| e.to_string())?;
    let names: Vec<_> = workloads.iter().map(|w| w.name).collect();
    let w = workloads
        .into_iter()
        .find(|w| w.name == name)
        .ok_or_else(|| format!("no workload `{name}` (expected one of {})", names.join(", ")))?;
    let mut rig = Rig::new(BackendKind::Interp, &w.guest)?;
    for _ in 0..runs {
        let (outcome, retired) = rig.reset_and_run().map_err(|e| e.to_string())?;
        if outcome.stop != (StopReason::DebugExit { value: 0 }) {
            return Err(format!("{name} ended with {}", outcome.stop));
        }
        let n = retired.ok_or("the interpreter did not count instructions")?;
        let secs = outcome.wall.as_secs_f64();
        println!("{name}: {n} instructions in {:.3} ms = {:.2} MIPS", secs * 1e3, n as f64 / secs / 1e6);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [name] => run(name, 5),
        [name, runs] => {
            runs.parse().map_err(|_| format!("`{runs}` is not a number")).and_then(|r| run(name, r))
        }
        _ => Err("usage: duet-interp-speed <alu|sieve|copy|call-ret|paging> [runs]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duet-interp-speed: {e}");
            ExitCode::FAILURE
        }
    }
}
