//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Run the same x86 guest on the host CPU (KVM) and on duet's software CPU, and compare.
#[derive(Parser, Debug)]
#[command(name = "duet", version, about, long_about = None, after_help = after_help())]
pub struct Cli {
    /// What to do (default: `run`, which runs the `hello` guest on the best backend).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `duet --help`'s closing text: examples, then the exit statuses.
fn after_help() -> String {
    format!("{AFTER_HELP}\n\n{}", crate::status::help_table())
}

const AFTER_HELP: &str = "\
Examples:
  duet run                          run the `hello` guest on the best backend
  duet run --backend fastest        run it on whichever backend is faster on this host
  duet run --backend both --fixture alu
                                    run on KVM and the software CPU, print the differences
  duet run --mode real boot.bin     run a flat real-mode image loaded at 0x7c00
  duet doctor                       explain what this host offers";

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a fixture or an image on one backend or on both.
    Run(RunArgs),
    /// List the built-in guests, one line each.
    List,
    /// Check this host for virtualization support, measure each backend's speed, say what `auto` and `fastest` pick.
    Doctor(DoctorArgs),
    /// Generate random programs, run them on KVM and the software CPU, save every divergence.
    Fuzz(crate::fuzz_cmd::FuzzArgs),
    /// Replay case files on both backends (or against their recorded result) and show the first difference.
    Diff(crate::fuzz_cmd::DiffArgs),
    /// Print which general-purpose and system instructions the software CPU implements.
    Coverage,
}

impl Default for Command {
    fn default() -> Self {
        Command::Run(RunArgs::default())
    }
}

/// Which CPU runs the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// KVM when usable (the hardware is the reference for fidelity), else the software CPU.
    #[default]
    Auto,
    /// Whichever backend runs a short calibration loop faster on this host (a few ms; printed with the reason).
    Fastest,
    /// The host CPU through /dev/kvm.
    Kvm,
    /// duet's software CPU.
    Interp,
    /// KVM and the software CPU, then compare the final states (exit status 2 when they differ).
    Both,
    /// The QEMU TCG reference (a third opinion; needs qemu-system-x86_64).
    Qemu,
    /// KVM, the software CPU and QEMU: each value on each, and which one stands alone.
    All,
}

/// The CPU mode an image is entered in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// 16-bit real mode; entry E becomes CS = (E >> 4) & 0xF000, IP = E - CS*16.
    Real,
    /// 32-bit protected mode, flat segments, no paging.
    Protected,
    /// 64-bit long mode, first 4 GiB identity-mapped with 2 MiB pages.
    #[default]
    Long,
}

/// Arguments of `duet run`.
#[derive(Args, Debug, Default)]
#[command(after_help = run_help())]
pub struct RunArgs {
    /// Backend to run on.
    #[arg(long, short, value_enum, default_value_t)]
    pub backend: BackendArg,
    /// A built-in guest (see `duet list`); the default when no IMAGE is given is `hello`.
    #[arg(long, short, conflicts_with_all = ["image", "bios"])]
    pub fixture: Option<String>,
    /// A flat binary (or an ELF file, loaded by its program headers) to run.
    #[arg(conflicts_with = "bios")]
    pub image: Option<PathBuf>,
    /// A 64 or 128 KiB firmware image, mapped below 1 MiB and below 4 GiB, started at the reset vector.
    #[arg(long)]
    pub bios: Option<PathBuf>,
    /// Mode a flat image is entered in (images only: a fixture and a ROM choose their own).
    #[arg(long, value_enum, default_value_t, conflicts_with_all = ["fixture", "bios"], requires = "image")]
    pub mode: ModeArg,
    /// Guest physical load address of a flat image (hex with 0x); default 0x7c00 in real mode, else 0x100000.
    #[arg(long, value_parser = parse_u64, conflicts_with_all = ["fixture", "bios"], requires = "image")]
    pub load_addr: Option<u64>,
    /// Entry address (hex with 0x); default: the load address (ELF: its entry point).
    #[arg(long, value_parser = parse_u64, conflicts_with_all = ["fixture", "bios"], requires = "image")]
    pub entry: Option<u64>,
    /// Guest RAM, e.g. 32M, 1G, 65536 (default 32M).
    #[arg(long, value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Wall-clock limit of each run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Print the final registers.
    #[arg(long)]
    pub regs: bool,
    /// Print every differing row of a comparison (default: the first 40 and a count of the rest).
    #[arg(long)]
    pub all_rows: bool,
}

/// Rows of a comparison table printed without `--all-rows`.
pub const DEFAULT_ROWS: usize = 40;

/// `duet run --help`'s closing text: the guest environment, backends, exit statuses.
fn run_help() -> String {
    format!("{RUN_HELP}\n{}", crate::status::help_table())
}

const RUN_HELP: &str = "\
Guest environment (what an image can rely on):
  ports    0x3F8 16550 UART, 0xE9 debug console, 0x80 POST code,
           0xF4 debug exit: writing v ends the run with exit status (v << 1) | 1
  memory   0x500 exception report, 0x1000 GDT (0x08 code32, 0x10 data, 0x18 code64),
           0x2000 IDT, 0x3000 IDT stubs (report vector, error code, RIP and halt),
           0x10000 page tables (long mode), stack top 0x80000 (0x7c00 in real mode),
           0xD0000000 MMIO test device (0x00 ID, 0x08 scratch, 0x10 counter, 0x18 IRQ)
Backends: `auto` is about fidelity: KVM whenever it is usable, since the hardware is the
  reference, else the software CPU. `fastest` is about speed: it first runs the same small
  ALU loop (8,000 instructions) on each usable backend, then picks the one with more
  instructions per second and prints both speeds on stderr. Where KVM emulates the guest
  (nested hosts) that is often the software CPU; `duet doctor` shows both speeds.
Comparing (--backend both, all): registers are compared only when each run ended by itself
  (debug exit, HLT, a reported exception); after a shutdown only memory and console are, and a
  run that reached its deadline or could not go on has no result to compare: duet says what
  each side did and exits with that outcome's status.";

/// Arguments of `duet doctor`.
#[derive(Args, Debug, Default)]
pub struct DoctorArgs {
    /// Also run small probe guests on KVM for the defects known on nested/emulated hosts.
    #[arg(long)]
    pub kvm_selfcheck: bool,
}

/// Parses a number in decimal or 0x-hex.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("`{s}` is not a number (use decimal or 0x-prefixed hex)"))
}

/// Parses a size with an optional K/M/G suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    parse_u64(num)?.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_sizes_parse() {
        assert_eq!(parse_u64("0x7c00"), Ok(0x7c00));
        assert_eq!(parse_u64("1_000"), Ok(1000));
        assert!(parse_u64("7c00").is_err());
        assert_eq!(parse_size("32M"), Ok(32 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn no_arguments_means_run_hello_on_auto() {
        let cli = Cli::try_parse_from(["duet"]).unwrap();
        assert!(cli.command.is_none());
        let cli = Cli::try_parse_from(["duet", "run", "--backend", "both", "--fixture", "alu"]).unwrap();
        match cli.command {
            Some(Command::Run(a)) => {
                assert_eq!(a.backend, BackendArg::Both);
                assert_eq!(a.fixture.as_deref(), Some("alu"));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["duet", "run", "--fixture", "x", "img.bin"]).is_err());
    }

    #[test]
    fn image_options_are_refused_where_no_image_is_run() {
        for opt in [["--mode", "real"], ["--entry", "0x7c00"], ["--load-addr", "0x7c00"]] {
            let with_fixture = ["duet", "run", "--fixture", "alu", opt[0], opt[1]];
            let err = Cli::try_parse_from(with_fixture).unwrap_err().to_string();
            assert!(err.contains("cannot be used with") && err.contains("--fixture"), "{err}");
            let with_bios = ["duet", "run", "--bios", "rom.bin", opt[0], opt[1]];
            assert!(Cli::try_parse_from(with_bios).is_err(), "{opt:?} with --bios");
            assert!(Cli::try_parse_from(["duet", "run", opt[0], opt[1]]).is_err(), "{opt:?} alone");
            assert!(Cli::try_parse_from(["duet", "run", opt[0], opt[1], "boot.bin"]).is_ok());
        }
        // The default mode is not "given": a fixture alone parses.
        assert!(Cli::try_parse_from(["duet", "run", "--fixture", "alu"]).is_ok());
    }

    #[test]
    fn fastest_is_a_backend_choice() {
        let cli = Cli::try_parse_from(["duet", "run", "--backend", "fastest"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Run(RunArgs { backend: BackendArg::Fastest, .. }))));
    }
}
