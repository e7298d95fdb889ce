//! The Prometheus text exposition format (version 0.0.4): `# HELP` and `# TYPE` lines per
//! family, then one line per sample, label values escaped.
//!
//! Written by hand: the format is a few lines of text, and every family but the histograms is
//! read at scrape time from state the service holds anyway (pools, jobs, snapshots), which a
//! registry of long-lived metric objects (the `prometheus-client` crate's model) would have to
//! copy on every change instead.

use std::fmt::Write;

/// A family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A value that only goes up (names end in `_total`).
    Counter,
    /// Buckets, sum and count.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }
}

/// Builds an exposition.
#[derive(Debug, Default)]
pub struct MetricWriter {
    out: String,
}

/// Label pairs of a sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A number as the format writes it (`+Inf`, `NaN`, integers without a fraction).
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl MetricWriter {
    /// Starts a family: its help text and type.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
    }

    /// A sample of the current family (`name` includes any `_bucket`/`_sum`/`_count` suffix).
    pub fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(v, &mut self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&number(value));
        self.out.push('\n');
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The exposition.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_with_escaped_labels() {
        let mut w = MetricWriter::default();
        w.family("strata_x_bytes", Kind::Gauge, "Some \\ help\nmore");
        w.sample(
            "strata_x_bytes",
            &[("name", "a\"b\\c\nd"), ("vg", "strata")],
            1.5,
        );
        w.sample("strata_x_bytes", &[], f64::INFINITY);
        w.sample("strata_x_bytes", &[], 3.0);
        assert_eq!(
            w.finish(),
            "# HELP strata_x_bytes Some \\\\ help\\nmore\n# TYPE strata_x_bytes gauge\n\
             strata_x_bytes{name=\"a\\\"b\\\\c\\nd\",vg=\"strata\"} 1.5\n\
             strata_x_bytes +Inf\nstrata_x_bytes 3\n"
        );
    }
}
