//! duet backend: a software x86 CPU on the iced-x86 decoder
