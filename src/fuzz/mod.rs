//! The differential engine: generate programs, run them on KVM and on the software CPU,
//! and hand back a minimal case for every place they disagree.
//!
//! - [`gen`]: proptest strategies of programs (registers, segments, flags, data, instructions
//!   the interpreter implements, encoded with iced-x86) in six modes, realized into [`Case`]s.
//! - [`exec`]: one reused machine per backend and mode; memory and registers are reset
//!   between cases; every port and MMIO access is logged.
//! - [`outcome`] and [`diff`]: what a run produced and what differs, as typed values (case
//!   files hold them as readable text, parsed once when a case is loaded).
//! - [`check`] and [`judge`]: compare final registers, changed memory and the exit sequence,
//!   masking only undefined flags; cases this host's KVM cannot decide are counted apart
//!   ([`limits`], each limit scoped to the vendors and KVM kinds it was verified on) and offered
//!   to a third opinion ([`judge::Reference`]).
//! - [`lockstep`]: single-step both backends to the first instruction after which they differ.
//! - [`campaign`]: seeds, shards, threads, shrinking, case files.
//!
//! ```no_run
//! use duet::fuzz::campaign::{self, Config};
//! use duet::fuzz::FuzzMode;
//!
//! let cfg = Config { modes: vec![FuzzMode::Long64], cases: 100, ..Config::default() };
//! let summary = campaign::run(&cfg, &mut |_| {})?;
//! assert!(summary.found.is_empty(), "{:?}", summary.found);
//! # Ok::<(), duet::fuzz::FuzzError>(())
//! ```

pub mod campaign;
pub mod case;
pub mod check;
pub mod diff;
pub mod exec;
pub mod gen;
pub mod judge;
pub mod layout;
pub mod limits;
pub mod lockstep;
pub mod outcome;
pub mod profile;
pub mod reference;
mod table;

pub use case::{Case, Expected, FuzzMode, Outcome, Source};
pub use check::{Checker, Verdict};

/// An error of the fuzzer (not a divergence: those are results).
#[derive(Debug, thiserror::Error)]
pub enum FuzzError {
    /// A case file is not JSON of the case format.
    #[error("{file}: not a duet case file: {why}")]
    CaseSyntax {
        /// The file.
        file: String,
        /// What the parser said.
        why: String,
    },
    /// A field of a case file has a bad value.
    #[error("{file}: field `{field}` {why}")]
    CaseField {
        /// The file.
        file: String,
        /// The field.
        field: String,
        /// What is wrong with it.
        why: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// A backend failed (not a guest event).
    #[error("{backend}: {why}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What failed.
        why: String,
    },
    /// The harness could not set a case up.
    #[error("setting up the case: {0}")]
    Setup(String),
}
