//! The QEMU process and its scratch directory, both cleaned up on drop (also on panic).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use duet_core::Availability;

use crate::QemuError;

/// The QEMU binary: `$DUET_QEMU` if set, else `qemu-system-x86_64` from PATH.
pub fn program() -> String {
    std::env::var("DUET_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// A scratch directory removed with everything in it when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new() -> Result<Self, QemuError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("duet-qemu-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).map_err(|source| QemuError::Io {
            what: "creating",
            path: path.display().to_string(),
            source,
        })?;
        Ok(TempDir { path })
    }

    /// The file `name` inside the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `bytes` to the file `name` and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, QemuError> {
        let p = self.file(name);
        std::fs::write(&p, bytes).map_err(|source| QemuError::Io {
            what: "writing",
            path: p.display().to_string(),
            source,
        })?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Nothing useful can be done if removal fails; the directory is in the temp dir.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Reads a file, empty when it does not exist.
pub fn read_or_empty(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// A running QEMU, killed and reaped when dropped (or by [`kill_all`]).
pub struct Qemu {
    child: Arc<Mutex<Child>>,
    program: String,
    stderr: PathBuf,
}

/// Every QEMU this process started that is still running, for [`kill_all`].
static LIVE: Mutex<Vec<Weak<Mutex<Child>>>> = Mutex::new(Vec::new());

/// Kills every QEMU this process started and has not reaped yet. A process that is about to
/// exit at once (a second Ctrl-C) calls it: its drops will not run, and QEMU runs in a process
/// group of its own, so nothing else would stop it.
pub fn kill_all() {
    let live = LIVE.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default();
    for child in live.iter().filter_map(Weak::upgrade) {
        if let Ok(mut c) = child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The status a spawned child exits with when its exec failed (glibc's posix_spawn, POSIX shells).
const EXEC_FAILED: i32 = 127;

impl Qemu {
    /// Starts `program` with `args`, stdout discarded and stderr to `stderr`.
    pub fn spawn(program: &str, args: &[String], stderr: PathBuf) -> Result<Self, QemuError> {
        let err_file = std::fs::File::create(&stderr).map_err(|source| QemuError::Io {
            what: "creating",
            path: stderr.display().to_string(),
            source,
        })?;
        // A process group of its own: a terminal's Ctrl-C goes to duet, which decides when QEMU
        // stops (`duet fuzz` finishes the case in flight, QEMU run included).
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .process_group(0)
            .spawn()
            .map_err(|source| QemuError::Spawn { program: program.into(), source })?;
        let child = Arc::new(Mutex::new(child));
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|c| c.strong_count() > 0);
            live.push(Arc::downgrade(&child));
        }
        Ok(Qemu { child, program: program.into(), stderr })
    }

    /// What QEMU wrote on stderr so far (trimmed, at most 2000 characters).
    pub fn stderr(&self) -> String {
        let t = String::from_utf8_lossy(&read_or_empty(&self.stderr)).trim().to_string();
        t.chars().take(2000).collect()
    }

    /// `Err(Exited)` when QEMU is no longer running.
    pub fn check_alive(&mut self) -> Result<(), QemuError> {
        let waited = match self.child.lock() {
            Ok(mut c) => c.try_wait(),
            Err(_) => Err(std::io::Error::other("the child's lock is poisoned")),
        };
        match waited {
            Ok(None) => Ok(()),
            // Where spawning cannot report an exec failure (a process under qemu-user: its vfork
            // is a fork), a program that cannot be executed is a child that exits 127 silently.
            Ok(Some(status)) if status.code() == Some(EXEC_FAILED) && self.stderr().is_empty() => {
                Err(QemuError::Spawn {
                    program: self.program.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("it exited with status {EXEC_FAILED}, a failed exec, and printed nothing"),
                    ),
                })
            }
            Ok(Some(status)) => Err(QemuError::Exited { status: status.to_string(), stderr: self.stderr() }),
            Err(e) => Err(QemuError::Exited { status: format!("unknown ({e})"), stderr: self.stderr() }),
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Killing an already exited child fails harmlessly; wait reaps it either way.
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether QEMU can be used here: the binary runs and prints its version.
pub fn availability() -> Availability {
    let prog = program();
    let mut child = match Command::new(&prog).arg("--version").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(e) => {
            return Availability::Unavailable(format!(
                "{prog} cannot be run ({e}); install QEMU (Debian: apt-get install qemu-system-x86) or set DUET_QEMU"
            ))
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Availability::Unavailable(format!("{prog} --version did not answer within 10 s"));
            }
        }
    };
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut out);
    }
    match out.lines().next().filter(|l| l.contains("QEMU emulator version")) {
        Some(line) => Availability::Available(format!("{prog}: {}", line.trim())),
        // Where spawning cannot report an exec failure (a process under qemu-user: its vfork is a
        // fork), a program that cannot be executed shows up as a child that failed silently.
        None if out.is_empty() && status.code() == Some(EXEC_FAILED) => Availability::Unavailable(format!(
            "{prog} cannot be run (it exited with status {EXEC_FAILED}, a failed exec, and printed nothing); \
             install QEMU (Debian: apt-get install qemu-system-x86) or set DUET_QEMU"
        )),
        None => Availability::Unavailable(format!("{prog} --version printed {out:?}, not a QEMU version")),
    }
}
