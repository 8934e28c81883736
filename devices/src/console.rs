//! [`Console`]: the sink for every byte the guest prints: streamed, counted, its tail kept.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

/// Longest a byte echoed to stdout waits there: stdout itself writes at each newline, and what
/// is left (a prompt without a newline) is flushed within this interval by the echo flusher, so
/// a guest printing a byte per port write costs no system call per byte and a prompt still
/// shows while the guest computes.
pub const ECHO_FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Whether echoed output may be waiting in stdout's buffer.
static ECHO_PENDING: AtomicBool = AtomicBool::new(false);

/// Starts (once per process) the thread that flushes echoed output left in stdout's buffer
/// every [`ECHO_FLUSH_INTERVAL`]; it sleeps while nothing is pending and ends with the process.
fn start_echo_flusher() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let flusher = std::thread::Builder::new().name("duet-console-flush".into()).spawn(|| loop {
            std::thread::sleep(ECHO_FLUSH_INTERVAL);
            if ECHO_PENDING.swap(false, Ordering::AcqRel) {
                let _ = io::stdout().lock().flush();
            }
        });
        // Without the thread, output still reaches stdout at each newline and at the run's end.
        drop(flusher);
    });
}

/// Bytes of guest output a [`Console`] keeps (the most recent ones): enough for every fixture's
/// expected text and an end-of-run summary, small enough that a guest printing without end
/// cannot grow duet's memory with it.
pub const CONSOLE_TAIL: usize = 1 << 20;

/// Everything a console knows about the output so far: its tail, its length and its digest.
#[derive(Debug)]
struct Transcript {
    /// The last bytes printed: at most 2 × [`CONSOLE_TAIL`] (cut back to one tail when full).
    tail: Vec<u8>,
    /// Bytes printed in all.
    total: u64,
    /// FNV-1a (64-bit) of every byte printed, so two runs' outputs compare without keeping them.
    digest: u64,
    /// When echoed output was last flushed to stdout.
    flushed: Option<Instant>,
}

/// The FNV-1a 64-bit offset basis (Fowler–Noll–Vo, IETF draft-eastlake-fnv).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// The FNV 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Default for Transcript {
    fn default() -> Self {
        Transcript { tail: Vec::new(), total: 0, digest: FNV_OFFSET, flushed: None }
    }
}

impl Transcript {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.digest = (self.digest ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        self.total = self.total.saturating_add(bytes.len() as u64);
        let keep = &bytes[bytes.len().saturating_sub(CONSOLE_TAIL)..];
        self.tail.extend_from_slice(keep);
        if self.tail.len() > 2 * CONSOLE_TAIL {
            // Amortised: one move of a tail's worth per tail's worth of output.
            self.tail.drain(..self.tail.len() - CONSOLE_TAIL);
        }
    }

    fn last(&self) -> &[u8] {
        &self.tail[self.tail.len().saturating_sub(CONSOLE_TAIL)..]
    }
}

/// What a console printed in all, in a form two runs can be compared by without keeping it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleDigest {
    /// Bytes printed.
    pub len: u64,
    /// FNV-1a 64-bit hash of those bytes.
    pub hash: u64,
}

impl ConsoleDigest {
    /// The digest of `bytes` (what a console that printed exactly them reports).
    pub fn of(bytes: &[u8]) -> ConsoleDigest {
        let mut t = Transcript::default();
        t.push(bytes);
        ConsoleDigest { len: t.total, hash: t.digest }
    }
}

/// A cloneable sink for guest output: every clone appends to one shared transcript.
///
/// The UART and the debug console write into the same `Console`. With echo on, each write is
/// copied to stdout, which shows it at the next newline or within [`ECHO_FLUSH_INTERVAL`], so a
/// user watches the guest print live. The console
/// keeps only the last [`CONSOLE_TAIL`] bytes, with the length and a digest of everything, so a
/// guest that prints for hours costs no more memory than one that prints a line.
#[derive(Clone, Debug, Default)]
pub struct Console {
    buffer: Arc<Mutex<Transcript>>,
    echo: bool,
}

impl Console {
    /// An empty console; with `echo`, output is also streamed to stdout.
    pub fn new(echo: bool) -> Self {
        Console { buffer: Arc::default(), echo }
    }

    /// Whether output is streamed to stdout as well as captured.
    pub fn echoes(&self) -> bool {
        self.echo
    }

    /// Appends `bytes` to the transcript (and echoes them when asked).
    pub fn push(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut t = self.lock();
        t.push(bytes);
        if self.echo {
            let mut out = io::stdout().lock();
            // A closed stdout (e.g. `duet run | head`) must not stop the guest; the digest
            // still counts everything.
            let _ = out.write_all(bytes);
            if t.flushed.is_none_or(|at| at.elapsed() >= ECHO_FLUSH_INTERVAL) {
                let _ = out.flush();
                t.flushed = Some(Instant::now());
            } else {
                ECHO_PENDING.store(true, Ordering::Release);
                start_echo_flusher();
            }
        }
    }

    /// Writes out what was echoed and is still buffered (at the end of a run).
    pub fn flush(&self) {
        if self.echo {
            let _ = io::stdout().lock().flush();
            self.lock().flushed = Some(Instant::now());
        }
    }

    /// The last bytes printed (all of them when fewer than [`CONSOLE_TAIL`]).
    pub fn contents(&self) -> Vec<u8> {
        self.lock().last().to_vec()
    }

    /// [`Console::contents`] as text, with invalid UTF-8 replaced by U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.lock().last()).into_owned()
    }

    /// Number of bytes printed so far (all of them, not only the kept tail).
    pub fn len(&self) -> u64 {
        self.lock().total
    }

    /// Whether nothing has been printed.
    pub fn is_empty(&self) -> bool {
        self.lock().total == 0
    }

    /// The length and hash of everything printed so far.
    pub fn digest(&self) -> ConsoleDigest {
        let t = self.lock();
        ConsoleDigest { len: t.total, hash: t.digest }
    }

    /// Forgets the transcript (e.g. between two runs of the same machine).
    pub fn clear(&self) {
        *self.lock() = Transcript::default();
    }

    /// Locks the buffer, recovering from a poisoned lock (a panicking test thread must not wedge others).
    fn lock(&self) -> MutexGuard<'_, Transcript> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Console::flush(self);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_clones_share_one_transcript() {
        let a = Console::new(false);
        let mut b = a.clone();
        a.push(b"hello ");
        b.write_all(b"world").unwrap();
        assert_eq!(a.contents(), b"hello world");
        assert_eq!(b.text(), "hello world");
        assert_eq!(a.len(), 11);
        b.clear();
        assert!(a.is_empty());
    }

    #[test]
    fn console_text_replaces_invalid_utf8() {
        let c = Console::new(false);
        c.push(&[b'o', b'k', 0xff]);
        assert_eq!(c.text(), "ok\u{fffd}");
        assert_eq!(c.contents(), vec![b'o', b'k', 0xff]);
    }

    #[test]
    fn console_keeps_a_bounded_tail_and_counts_everything() {
        let c = Console::new(false);
        // Three tails' worth, in pieces of a prime size so the cut falls mid-piece.
        let piece: Vec<u8> = (0..4099u32).map(|i| (i % 251) as u8).collect();
        let mut all = Vec::new();
        while all.len() < 3 * CONSOLE_TAIL {
            c.push(&piece);
            all.extend_from_slice(&piece);
        }
        assert_eq!(c.len(), all.len() as u64);
        assert_eq!(c.contents(), all[all.len() - CONSOLE_TAIL..].to_vec());
        assert!(c.lock().tail.len() <= 2 * CONSOLE_TAIL);
        assert_eq!(c.digest(), ConsoleDigest::of(&all));
        c.clear();
        assert!(c.is_empty());
        assert_eq!(c.digest(), ConsoleDigest::of(b""));
    }

    #[test]
    fn console_digest_tells_outputs_apart_that_share_their_tail() {
        // Same length, same last bytes, a different first byte.
        let mut a = vec![b'x'; CONSOLE_TAIL + 10];
        let b = a.clone();
        a[0] = b'y';
        assert_ne!(ConsoleDigest::of(&a), ConsoleDigest::of(&b));
        // FNV-1a 64 of "a" (the published test vector): 0xaf63dc4c8601ec8c.
        assert_eq!(ConsoleDigest::of(b"a").hash, 0xaf63_dc4c_8601_ec8c);
    }
}
