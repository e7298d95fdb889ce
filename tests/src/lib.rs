//! Helpers for Strata's end-to-end tests: locating the `strata` binary and external tools.
