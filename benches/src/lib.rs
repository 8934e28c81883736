//! duet criterion benchmarks (see benches/).
