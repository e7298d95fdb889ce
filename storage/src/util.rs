//! Small helpers shared across the block layer: zero detection and human-readable sizes.

use crate::error::{Result, StorageError};

/// Whether every byte of `data` is zero. Compares 16 bytes at a time; the compiler vectorises it.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, body, tail) = {
        // Split into an unaligned head, a u128-aligned body and a tail.
        // SAFETY: every bit pattern is a valid u128, so reinterpreting aligned bytes is sound.
        unsafe { data.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Parses an on/off option value (`on`, `true`, `yes` / `off`, `false`, `no`) for option `key`.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(crate::error::StorageError::InvalidInput(format!(
            "Option {key} takes on or off, not '{v}'"
        ))),
    }
}

/// Parses a size such as `512`, `4k`, `512M`, `10G`, `1.5T` or `4096B` into bytes.
///
/// Suffixes are binary (K = 1024) as in qemu-img and LVM; a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let bad = || {
        StorageError::InvalidInput(format!(
            "Invalid size '{text}': expected a number with an optional K, M, G, T or P suffix"
        ))
    };
    if t.is_empty() {
        return Err(bad());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    let bytes = if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let b = v * (1u64 << shift) as f64;
        if !b.is_finite() || b < 0.0 || b >= u64::MAX as f64 {
            return Err(StorageError::InvalidInput(format!(
                "Size '{text}' is too large"
            )));
        }
        if b.fract() != 0.0 {
            return Err(StorageError::InvalidInput(format!(
                "Size '{text}' is not a whole number of bytes"
            )));
        }
        b as u64
    } else {
        let v: u64 = num.parse().map_err(|_| bad())?;
        v.checked_mul(1u64 << shift)
            .ok_or_else(|| StorageError::InvalidInput(format!("Size '{text}' is too large")))?
    };
    Ok(bytes)
}

/// Formats a byte count with a binary suffix, e.g. `1 GiB` or `1.5 MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() == 0.0 {
        format!("{} {}", value as u64, UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub fn align_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (value + align - 1) & !(align - 1)
}

/// Rounds `value` down to a multiple of `align` (a power of two).
pub fn align_down(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    value & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_handles_unaligned_edges() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v[3..997]));
        v[998] = 1;
        assert!(is_zero(&v[3..997]));
        assert!(!is_zero(&v[3..999]));
        v[500] = 7;
        assert!(!is_zero(&v[1..600]));
        assert!(is_zero(&[]));
    }

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        for bad in [
            "",
            "abc",
            "10Q",
            "-5",
            "1.3",
            "99999999999999999999",
            "16E",
            "M",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn sizes_format_with_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536 * 1024), "1.50 MiB");
    }
}
