//! Benchmarks live in scripts beside this crate; see benches/README.md.
