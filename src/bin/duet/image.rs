//! Turning `duet run` arguments into a guest: a fixture, a flat image, an ELF file or a ROM.

use std::io::Read;
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

/// Largest firmware image `--bios` takes (the builder maps 64 or 128 KiB below 4 GiB).
pub const MAX_BIOS: u64 = 128 << 10;

/// Largest image file: the guest's RAM, and never more than the 4 GiB an image or an ELF
/// segment can be loaded into.
pub fn max_image(ram: u64) -> u64 {
    ram.min(4 << 30)
}

/// `n` bytes in words: `32 MiB`, `128 KiB`, or a plain count.
fn size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// Reads `path` whole when it holds at most `limit` bytes; one clear error otherwise. A device
/// or a pipe (`/dev/zero`) is read only up to one byte past the limit.
pub fn read_at_most(path: &Path, what: &str, limit: u64, why: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let too_large = || anyhow!("{what} {} is larger than {} ({why})", path.display(), size(limit));
    if file.metadata().is_ok_and(|m| m.is_file() && m.len() > limit) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Builds the guest `args` describe.
pub fn prepare(args: &RunArgs) -> Result<Prepared> {
    if let Some(path) = &args.bios {
        let rom = read_at_most(path, "firmware image", MAX_BIOS, "a ROM is 64 or 128 KiB")?;
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
    let ram = args.mem.unwrap_or(duet_core::layout::DEFAULT_MEM_SIZE);
    let why = format!("the guest has {} of RAM; --mem sets it", size(ram));
    let bytes = read_at_most(path, "image", max_image(ram), &why)?;
    let mut b = GuestBuilder::new(mode(args.mode));
    if let Some(m) = args.mem {
        b = b.ram_size(m);
    }
    if elf::is_elf(&bytes) {
        let img = elf::parse(&bytes).map_err(|e| anyhow!("cannot load ELF image {}: {e}", path.display()))?;
        if img.is_64 && args.mode != ModeArg::Long {
            bail!("{} is a 64-bit ELF file: run it with --mode long", path.display());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_refused_one_byte_past_the_limit() {
        let path = std::env::temp_dir().join(format!("duet-image-limit-{}", std::process::id()));
        std::fs::write(&path, [7u8; 17]).unwrap();
        assert_eq!(read_at_most(&path, "image", 17, "x").unwrap(), vec![7u8; 17]);
        let err = read_at_most(&path, "image", 16, "why").unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert_eq!(err, format!("image {} is larger than 16 bytes (why)", path.display()));
        // A device that never ends is read only to one byte past the limit.
        let err = read_at_most(Path::new("/dev/zero"), "firmware image", MAX_BIOS, "a ROM").unwrap_err();
        assert_eq!(err.to_string(), "firmware image /dev/zero is larger than 128 KiB (a ROM)");
        assert_eq!(max_image(64 << 30), 4 << 30);
    }
}
