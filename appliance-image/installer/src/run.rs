//! Running the system tools the installer relies on (sgdisk, mkfs, grub-install, mount), with
//! their output kept for the error message when they fail.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use super::error::{InstallError, InstallResult};

/// Lines of a failed tool's output quoted in the error.
const ERROR_LINES: usize = 12;

/// Runs `program` with `args`; returns its standard output. A non-zero exit becomes
/// [`InstallError::ToolFailed`] quoting the end of its output.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> InstallResult<String> {
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    tracing::debug!(program, args = ?shown, "running");
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| InstallError::ToolMissing {
            tool: program.to_string(),
            err,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| !l.trim().is_empty())
        .collect();
    let tail = all[all.len().saturating_sub(ERROR_LINES)..].join(" | ");
    Err(InstallError::ToolFailed {
        tool: format!(
            "{program} {}",
            shown.first().map(String::as_str).unwrap_or("")
        ),
        status: out.status.to_string(),
        output: if tail.is_empty() {
            "no output".into()
        } else {
            tail
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_success_failure_and_missing_tools() {
        assert_eq!(run("sh", &["-c", "echo hi"]).unwrap(), "hi\n");
        let e = run("sh", &["-c", "echo out; echo bad >&2; exit 3"]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("exit status: 3") && msg.contains("bad | out"),
            "{msg}"
        );
        let e = run("strata-no-such-tool", &["x"]).unwrap_err();
        assert!(matches!(e, InstallError::ToolMissing { .. }), "{e}");
    }
}
