//! [`Console`]: the sink that captures every byte the guest prints.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

/// A cloneable sink for guest output: every clone appends to one shared buffer.
///
/// The UART and the debug console write into the same `Console`, so the caller reads one
/// transcript after the run. With echo on, each write is also copied to stdout and flushed at
/// once, so a user watches the guest print live.
#[derive(Clone, Debug, Default)]
pub struct Console {
    buffer: Arc<Mutex<Vec<u8>>>,
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
        self.lock().extend_from_slice(bytes);
        if self.echo {
            let mut out = io::stdout().lock();
            // A closed stdout (e.g. `duet run | head`) must not stop the guest; the transcript
            // still holds everything.
            let _ = out.write_all(bytes).and_then(|()| out.flush());
        }
    }

    /// Every byte printed so far.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// The transcript as text, with invalid UTF-8 replaced by U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock()).into_owned()
    }

    /// Number of bytes printed so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing has been printed.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Forgets the transcript (e.g. between two runs of the same machine).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Locks the buffer, recovering from a poisoned lock (a panicking test thread must not wedge others).
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
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
}
