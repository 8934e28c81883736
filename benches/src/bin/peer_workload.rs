//! `duet-peer-workload`: the boot-sector workloads `benches/peers.sh` runs on duet's
//! interpreter, QEMU TCG and Bochs.
//!
//! ```text
//! duet-peer-workload image <empty|alu|sieve> <file> [scale]   write a floppy image that boots it
//! duet-peer-workload interp <empty|alu|sieve> [scale]         run it on duet's interpreter
//! duet-peer-workload count <empty|alu|sieve> <scale>          instructions it retires at `scale`
//! ```
//!
//! `scale` is millions of loop iterations for `alu` (default 20) and sieve runs for `sieve`
//! (default 100). The count is linear in the scale, so `count` runs the interpreter at scales 1
//! and 2 and extrapolates exactly: a fast peer gets a large scale (long enough to time) without
//! the interpreter having to run it.
//!
//! A workload is 16-bit real-mode code in a boot sector (loaded at 0000:7C00 by any PC BIOS).
//! It does a fixed amount of work that depends on nothing the BIOS leaves behind, checks its
//! result, writes `P` (pass) or `F` (fail) and a newline to the debug console (port 0xE9), then
//! writes 0 (pass) or 1 (fail) to port 0xF4 (QEMU's isa-debug-exit, duet's debug exit) and
//! finally the string `Shutdown` to port 0x8900 (Bochs's shutdown port). Every CPU therefore
//! retires the same instructions from 0x7C00 to the exit; `interp` counts them.

use std::process::ExitCode;
use std::time::Instant;

use duet::fixtures::{assemble, FixtureError, GuestBuilder, Mode};
use duet::{BackendKind, StopReason};
use duet_benches::Rig;
use iced_x86::code_asm::*;

/// ALU loop iterations (8 instructions each) per unit of scale.
const ALU_UNIT: u32 = 1_000_000;
/// Sieve bound: the byte array fills most of one 64 KiB segment.
const SIEVE_LIMIT: u16 = 60_000;
/// π(60,000) = 6057 primes below 60,000 (the in-guest check).
const SIEVE_PRIMES: u16 = 6057;
/// Segment of the sieve's array (physical 0x10000).
const SIEVE_SEGMENT: u16 = 0x1000;
/// Load address of a boot sector.
const BOOT: u64 = 0x7c00;

/// The default scale of a workload.
fn default_scale(name: &str) -> u32 {
    match name {
        "alu" => 20,
        "sieve" => 100,
        _ => 1,
    }
}

/// Guest code emitted into the boot sector.
type Body = Box<dyn FnOnce(&mut CodeAssembler) -> Result<(), FixtureError>>;

fn workload(name: &str, scale: u32) -> Result<Vec<u8>, String> {
    let body: Body = match name {
        "empty" => Box::new(|a| Ok(a.xor(al, al)?)),
        "alu" => {
            let iters = scale.checked_mul(ALU_UNIT).ok_or(format!("alu scale {scale} is too large"))?;
            Box::new(move |a| alu(a, iters))
        }
        "sieve" => {
            let runs = u16::try_from(scale).map_err(|_| format!("sieve scale {scale} is above 65535"))?;
            Box::new(move |a| sieve(a, runs))
        }
        other => return Err(format!("unknown workload `{other}` (expected empty, alu or sieve)")),
    };
    if scale == 0 {
        return Err("the scale must be at least 1".into());
    }
    let mut code = assemble(16, BOOT, |a| {
        a.cli()?;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, BOOT as i32)?;
        body(a)?; // leaves 0 (pass) or 1 (fail) in AL
        report(a)
    })
    .map_err(|e| e.to_string())?;
    if code.len() > 510 {
        return Err(format!("workload `{name}` is {} bytes, more than a boot sector holds", code.len()));
    }
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xaa]);
    Ok(code)
}

/// AL = 0/1 → `P`/`F` and a newline on port 0xE9, AL on port 0xF4, `Shutdown` on port 0x8900.
fn report(a: &mut CodeAssembler) -> Result<(), FixtureError> {
    let (mut pass, mut halt) = (a.create_label(), a.create_label());
    a.mov(bl, al)?;
    a.mov(al, i32::from(b'P'))?;
    a.test(bl, bl)?;
    a.jz(pass)?;
    a.mov(al, i32::from(b'F'))?;
    a.set_label(&mut pass)?;
    a.out(0xe9, al)?;
    a.mov(al, i32::from(b'\n'))?;
    a.out(0xe9, al)?;
    a.mov(al, bl)?;
    a.out(0xf4, al)?;
    a.mov(dx, 0x8900)?;
    for byte in *b"Shutdown" {
        a.mov(al, i32::from(byte))?;
        a.out(dx, al)?;
    }
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;
    Ok(())
}

/// The shared ALU loop (`duet_fixtures::asm::alu_loop`), then AL = 0.
fn alu(a: &mut CodeAssembler, iters: u32) -> Result<(), FixtureError> {
    duet_benches::workloads::alu_loop(a, iters)?;
    a.xor(al, al)?;
    Ok(())
}

/// `runs` sieves of Eratosthenes below `SIEVE_LIMIT` (byte loops, no string
/// instructions, so every emulator counts the same instructions); AL = 0 when each finds
/// `SIEVE_PRIMES` primes, else 1.
fn sieve(a: &mut CodeAssembler, runs: u16) -> Result<(), FixtureError> {
    let limit = i32::from(SIEVE_LIMIT);
    let [mut again, mut fill, mut outer, mut inner, mut next, mut count, mut sum, mut fail, mut end] =
        [(); 9].map(|()| a.create_label());
    a.mov(ax, i32::from(SIEVE_SEGMENT))?;
    a.mov(ds, ax)?;
    a.mov(bp, i32::from(runs))?;
    a.set_label(&mut again)?;
    // arr[i] = 1 for all i < LIMIT, then arr[0] = arr[1] = 0.
    a.xor(di, di)?;
    a.set_label(&mut fill)?;
    a.mov(byte_ptr(di), 1)?;
    a.inc(di)?;
    a.cmp(di, limit)?;
    a.jb(fill)?;
    a.mov(word_ptr(0), 0)?;
    // for i = 2; i * i < LIMIT; i++: if arr[i], clear i*i, i*i + i, … below LIMIT.
    a.mov(bx, 2)?;
    a.set_label(&mut outer)?;
    a.mov(ax, bx)?;
    a.imul_2(ax, bx)?;
    a.cmp(ax, limit)?;
    a.jae(count)?;
    a.cmp(byte_ptr(bx), 0)?;
    a.je(next)?;
    a.mov(di, ax)?;
    a.set_label(&mut inner)?;
    a.mov(byte_ptr(di), 0)?;
    a.add(di, bx)?;
    a.jc(next)?;
    a.cmp(di, limit)?;
    a.jb(inner)?;
    a.set_label(&mut next)?;
    a.inc(bx)?;
    a.jmp(outer)?;
    // count = Σ arr[i]
    a.set_label(&mut count)?;
    a.xor(si, si)?;
    a.xor(bx, bx)?;
    a.xor(ah, ah)?;
    a.set_label(&mut sum)?;
    a.mov(al, byte_ptr(bx))?;
    a.add(si, ax)?;
    a.inc(bx)?;
    a.cmp(bx, limit)?;
    a.jb(sum)?;
    a.cmp(si, i32::from(SIEVE_PRIMES))?;
    a.jne(fail)?;
    a.dec(bp)?;
    a.jnz(again)?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.jmp(end)?;
    a.set_label(&mut fail)?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(al, 1)?;
    a.set_label(&mut end)?;
    Ok(())
}

/// Runs the workload on the interpreter: (instructions retired, seconds).
fn run_interp(name: &str, scale: u32) -> Result<(u64, f64), String> {
    let sector = workload(name, scale)?;
    let guest = GuestBuilder::new(Mode::Real)
        .name(format!("peer-{name}"))
        .load_addr(BOOT)
        .image(sector)
        .build()
        .map_err(|e| e.to_string())?;
    let mut rig = Rig::new(BackendKind::Interp, &guest)?;
    rig.reset().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let outcome = rig.run().map_err(|e| e.to_string())?;
    let wall = t.elapsed().as_secs_f64();
    if outcome.stop != (StopReason::DebugExit { value: 0 }) {
        return Err(format!("workload `{name}` did not pass on the interpreter: {}", outcome.stop));
    }
    let n = outcome.instructions.ok_or("the interpreter did not count instructions")?;
    Ok((n, wall))
}

fn scale_arg(name: &str, arg: Option<&str>) -> Result<u32, String> {
    match arg {
        None => Ok(default_scale(name)),
        Some(s) => s.parse().map_err(|_| format!("scale `{s}` is not a number")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["image", name, file, ref scale @ ..] if scale.len() <= 1 => {
            scale_arg(name, scale.first().copied()).and_then(|s| workload(name, s)).and_then(|sector| {
                let mut floppy = sector;
                floppy.resize(1_474_560, 0);
                std::fs::write(file, floppy).map_err(|e| format!("cannot write {file}: {e}"))
            })
        }
        ["interp", name, ref scale @ ..] if scale.len() <= 1 => scale_arg(name, scale.first().copied())
            .and_then(|s| run_interp(name, s))
            .map(|(n, wall)| println!("instructions {n} seconds {wall:.6}")),
        ["count", name, scale] => scale_arg(name, Some(scale)).and_then(|s| {
            let (one, _) = run_interp(name, 1)?;
            let (two, _) = run_interp(name, 2)?;
            let per = two - one;
            let n = (one - per) + per * u64::from(s);
            println!("{n}");
            Ok(())
        }),
        _ => Err("usage: duet-peer-workload image <workload> <file> [scale] | interp <workload> [scale] \
                  | count <workload> <scale>   (workload: empty, alu or sieve)"
            .into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("duet-peer-workload: {e}");
            ExitCode::FAILURE
        }
    }
}
