//! Turning `duet run` arguments into a guest: a fixture, a flat image, an ELF file or a ROM.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use duet_core::Guest;
use duet_fixtures::{GuestBuilder, Mode};

use crate::cli::{ModeArg, RunArgs};
use crate::elf;

/// The guest to run and, for fixtures, what it is expected to do.
pub struct Prepared {
    /// The guest.
    pub guest: Guest,
    /// The fixture it came from, if any.
    pub fixture: Option<duet_fixtures::Fixture>,
}

fn mode(m: ModeArg) -> Mode {
    match m {
        ModeArg::Real => Mode::Real,
        ModeArg::Protected => Mode::Protected,
        ModeArg::Long => Mode::Long,
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Builds the guest `args` describe.
pub fn prepare(args: &RunArgs) -> Result<Prepared> {
    if let Some(path) = &args.bios {
        let rom = read(path, "firmware image")?;
        let mut b = GuestBuilder::bios(rom);
        if let Some(m) = args.mem {
            b = b.ram_size(m);
        }
        let guest = b.build().with_context(|| format!("cannot map firmware image {}", path.display()))?;
        return Ok(Prepared { guest, fixture: None });
    }
    let Some(path) = &args.image else {
        let name = args.fixture.as_deref().unwrap_or("hello");
        // Probes of known KVM defects (`duet doctor --kvm-selfcheck`) run by name too.
        let found =
            duet_fixtures::find(name).or_else(|| duet_fixtures::probes::find_probe(name).map(|p| p.fixture));
        let Some(fixture) = found else {
            let names: Vec<&str> = duet_fixtures::catalogue().iter().map(|f| f.name).collect();
            let probes: Vec<&str> = duet_fixtures::probes::probes().iter().map(|p| p.fixture.name).collect();
            bail!(
                "no fixture named `{name}`; the fixtures are: {}; the KVM probes are: {}",
                names.join(", "),
                probes.join(", ")
            );
        };
        let mut guest = fixture.guest().with_context(|| format!("cannot build fixture `{name}`"))?;
        if let Some(m) = args.mem {
            guest.ram_size = m;
        }
        return Ok(Prepared { guest, fixture: Some(fixture) });
    };
    let bytes = read(path, "image")?;
    let mut b = GuestBuilder::new(mode(args.mode));
    if let Some(m) = args.mem {
        b = b.ram_size(m);
    }
    if elf::is_elf(&bytes) {
        let img = elf::parse(&bytes).map_err(|e| anyhow!("cannot load ELF image {}: {e}", path.display()))?;
        if img.is_64 && args.mode != ModeArg::Long {
            bail!("{} is a 64-bit ELF file: run it with --mode long", path.display());
        }
        let ram = args.mem.unwrap_or(duet_core::layout::DEFAULT_MEM_SIZE);
        if img.end > ram {
            bail!(
                "{} needs memory up to {:#x} (its segments with their zero-filled parts), beyond the {ram:#x} bytes of RAM; use a larger --mem",
                path.display(),
                img.end
            );
        }
        let entry = args.entry.unwrap_or(img.entry);
        // The segment holding the entry point is the image; the others are extra loads.
        let mut loads = img.loads;
        let Some(i) = loads.iter().position(|l| entry >= l.addr && entry - l.addr < l.bytes.len() as u64)
        else {
            bail!("the entry point {entry:#x} of {} lies in no loadable segment", path.display());
        };
        let main = loads.remove(i);
        b = b.load_addr(main.addr).entry(entry).image(main.bytes);
        for l in loads {
            b = b.load(l.addr, l.bytes);
        }
        for (addr, len) in img.zeroed {
            b = b.zeroed(addr, len);
        }
    } else {
        if bytes.is_empty() {
            bail!("image {} is empty", path.display());
        }
        if let Some(a) = args.load_addr {
            b = b.load_addr(a);
        }
        if let Some(e) = args.entry {
            b = b.entry(e);
        }
        b = b.image(bytes);
    }
    let guest = b.build().with_context(|| format!("cannot load image {}", path.display()))?;
    Ok(Prepared { guest, fixture: None })
}
