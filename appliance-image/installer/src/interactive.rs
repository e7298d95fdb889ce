//! The interactive installer: questions on the console (a serial line works the same) with
//! defaults in brackets. Each answer is checked by the same validation as an answer file, and
//! a bad one is asked again with the reason.

use std::io::{BufRead, Write};

use super::answers::{Answers, RawAnswers, KEYS};
use super::error::{InstallError, InstallResult};

/// Times a question is asked before the installer gives up.
const ATTEMPTS: usize = 8;

/// Questions and answers over a line-based terminal.
#[derive(Debug)]
pub struct Prompter<'a, R: BufRead + ?Sized, W: Write + ?Sized> {
    input: &'a mut R,
    out: &'a mut W,
}

fn out_err(e: std::io::Error) -> InstallError {
    InstallError::io("Writing to", "the console", e)
}

impl<'a, R: BufRead + ?Sized, W: Write + ?Sized> Prompter<'a, R, W> {
    /// A prompter reading `input` and writing `out`.
    pub fn new(input: &'a mut R, out: &'a mut W) -> Self {
        Prompter { input, out }
    }

    /// The output, for text written between questions.
    pub fn writer(&mut self) -> &mut W {
        self.out
    }

    /// Prints a line.
    pub fn say(&mut self, text: &str) -> InstallResult<()> {
        writeln!(self.out, "{text}").map_err(out_err)
    }

    /// Asks once; an empty reply takes `default`. End of input aborts the installation.
    pub fn ask(&mut self, question: &str, default: &str) -> InstallResult<String> {
        if default.is_empty() {
            write!(self.out, "{question}: ").map_err(out_err)?;
        } else {
            write!(self.out, "{question} [{default}]: ").map_err(out_err)?;
        }
        self.out.flush().map_err(out_err)?;
        let mut line = String::new();
        let n = self
            .input
            .read_line(&mut line)
            .map_err(|e| InstallError::io("Reading", "the console", e))?;
        if n == 0 {
            return Err(InstallError::Aborted(
                "Input ended; installation cancelled".into(),
            ));
        }
        let reply = line.trim();
        Ok(if reply.is_empty() { default } else { reply }.to_string())
    }

    /// Asks for answer `key` until the value passes validation; errors about other keys are
    /// left for their own questions.
    pub fn ask_answer(
        &mut self,
        raw: &mut RawAnswers,
        key: &str,
        question: &str,
    ) -> InstallResult<()> {
        let default = raw
            .get(key)
            .map(str::to_string)
            .or_else(|| {
                KEYS.iter()
                    .find(|(k, _, _)| *k == key)
                    .map(|(_, d, _)| d.to_string())
            })
            .unwrap_or_default();
        for _ in 0..ATTEMPTS {
            let reply = self.ask(question, &default)?;
            raw.set(key, &reply);
            match Answers::from_raw(raw) {
                Err(e @ InstallError::BadAnswer { .. }) if is_about(&e, key) => {
                    self.say(&format!("  {e}"))?;
                }
                _ => return Ok(()),
            }
        }
        Err(InstallError::Aborted(format!(
            "No valid answer for {key}; installation cancelled"
        )))
    }

    /// Asks the network questions: the kind, then what it needs.
    pub fn ask_network(&mut self, raw: &mut RawAnswers) -> InstallResult<()> {
        self.ask_answer(raw, "network", "Network (dhcp, static, none)")?;
        if raw.get("network") == Some("static") {
            if raw.get("interface").is_none_or(|i| i == "auto") {
                raw.set("interface", "eth0");
            }
            self.ask_answer(raw, "interface", "Interface")?;
            self.ask_answer(
                raw,
                "address",
                "Address with prefix length (e.g. 192.168.1.10/24)",
            )?;
            self.ask_answer(raw, "gateway", "Gateway (empty for none)")?;
            self.ask_answer(raw, "dns", "DNS servers, comma-separated (empty for none)")?;
        }
        Ok(())
    }

    /// Asks for the exact word `word`; anything else is a no.
    pub fn confirm(&mut self, question: &str, word: &str) -> InstallResult<bool> {
        Ok(self.ask(&format!("{question} Type '{word}' to go on"), "")? == word)
    }
}

fn is_about(e: &InstallError, key: &str) -> bool {
    matches!(e, InstallError::BadAnswer { key: k, .. } if k == key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answers::Network;

    #[test]
    fn bad_replies_are_asked_again_and_defaults_apply() {
        let mut input: &[u8] =
            b"bad_name\nstore-1\n\nstatic\n\n10.0.0.9\n10.0.0.9/24\n\n1.1.1.1\nyes\n";
        let mut out = Vec::new();
        let mut raw = RawAnswers::default();
        {
            let mut p = Prompter::new(&mut input, &mut out);
            p.ask_answer(&mut raw, "hostname", "Host name").unwrap();
            p.ask_answer(&mut raw, "listen", "API address").unwrap();
            p.ask_network(&mut raw).unwrap();
            assert!(p.confirm("Erase /dev/vda?", "yes").unwrap());
            let e = p.ask("More?", "").unwrap_err();
            assert!(matches!(e, InstallError::Aborted(_)));
        }
        let a = Answers::from_raw(&raw).unwrap();
        assert_eq!(a.hostname, "store-1");
        assert_eq!(a.listen.port(), 8006);
        match a.network {
            Network::Static {
                interface,
                prefix,
                gateway,
                dns,
                ..
            } => {
                assert_eq!((interface.as_str(), prefix, gateway), ("eth0", 24, None));
                assert_eq!(dns.len(), 1);
            }
            n => panic!("{n:?}"),
        }
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Host name [strata]: "), "{text}");
        assert!(text.contains("Answer hostname=\"bad_name\""), "{text}");
        assert!(text.contains("Answer address=\"10.0.0.9\""), "{text}");
        assert!(text.contains("Interface [eth0]: "), "{text}");
    }

    #[test]
    fn endless_bad_replies_give_up() {
        let mut input: &[u8] = b"x\nx\nx\nx\nx\nx\nx\nx\nx\n";
        let mut out = Vec::new();
        let mut raw = RawAnswers::default();
        let mut p = Prompter::new(&mut input, &mut out);
        let e = p.ask_answer(&mut raw, "listen", "API address").unwrap_err();
        assert!(e.to_string().contains("No valid answer for listen"), "{e}");
        assert!(!p.confirm("Sure?", "yes").unwrap_or(true));
    }
}
