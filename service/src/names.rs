//! Validation of user-chosen names (images, volumes, VMs, tokens).

use super::{ServiceError, ServiceResult};

/// Longest name accepted.
pub const MAX_NAME: usize = 64;

/// Accepts names of 1 to 64 characters from `A-Z a-z 0-9 . _ + -`, not starting with `.` or
/// `-`: no path separators, no `..`, no control characters, nothing a shell or a URL mangles.
pub fn validate(kind: &str, name: &str) -> ServiceResult<()> {
    let bad = |why: &str| {
        Err(ServiceError::BadRequest(format!(
            "Invalid {kind} name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME {
        return bad(&format!("it is longer than {MAX_NAME} characters"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it may not start with '.' or '-'");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')))
    {
        return bad(&format!(
            "character {c:?} is not allowed (use letters, digits, '.', '_', '+', '-')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names_and_refuses_dangerous_ones() {
        for ok in ["vm-100-disk-0", "base.qcow2", "a", "x_y+z"] {
            validate("image", ok).unwrap();
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "..",
            "../etc",
            "a/b",
            ".hidden",
            "-rf",
            "a\nb",
            "a b",
            "é",
            long.as_str(),
            "a\0",
        ] {
            assert!(validate("image", bad).is_err(), "{bad:?} was accepted");
        }
    }
}
