//! Histograms with fixed buckets, per label set, for the exposition (request latencies, job
//! durations). The label sets are bounded by their callers (route templates, job kinds).

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::text::{Kind, MetricWriter};

/// Label sets kept at most; observations for new sets beyond it are dropped.
pub const MAX_LABEL_SETS: usize = 1024;

#[derive(Clone, Debug, Default)]
struct Data {
    /// Observations per bucket (not cumulative), plus one for +Inf.
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A histogram family: bucket bounds, label names and the data per label set.
#[derive(Debug)]
pub struct HistogramVec {
    bounds: &'static [f64],
    label_names: &'static [&'static str],
    data: Mutex<BTreeMap<Vec<String>, Data>>,
}

impl HistogramVec {
    /// A family with these upper bounds (ascending) and label names.
    pub const fn new(bounds: &'static [f64], label_names: &'static [&'static str]) -> Self {
        HistogramVec {
            bounds,
            label_names,
            data: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records `value` for the label values (as many as label names).
    pub fn observe(&self, labels: &[&str], value: f64) {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        if !data.contains_key(&key) && data.len() >= MAX_LABEL_SETS {
            return;
        }
        let d = data.entry(key).or_insert_with(|| Data {
            buckets: vec![0; self.bounds.len() + 1],
            ..Default::default()
        });
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        d.buckets[i] += 1;
        d.sum += value;
        d.count += 1;
    }

    /// Observations recorded for these label values.
    pub fn count(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        self.data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map_or(0, |d| d.count)
    }

    /// Writes the family `name` (`_bucket`, `_sum`, `_count` samples per label set).
    pub fn write(&self, w: &mut MetricWriter, name: &str, help: &str) {
        w.family(name, Kind::Histogram, help);
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let bucket = format!("{name}_bucket");
        for (values, d) in &data {
            let mut labels: Vec<(&str, &str)> = self
                .label_names
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            let mut cumulative = 0;
            let les: Vec<String> = self
                .bounds
                .iter()
                .map(|b| super::text::number(*b))
                .chain(std::iter::once("+Inf".to_string()))
                .collect();
            for (n, le) in d.buckets.iter().zip(&les) {
                cumulative += n;
                labels.push(("le", le));
                w.sample(&bucket, &labels, cumulative as f64);
                labels.pop();
            }
            w.sample(&format!("{name}_sum"), &labels, d.sum);
            w.sample(&format!("{name}_count"), &labels, d.count as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_with_inf() {
        static H: HistogramVec = HistogramVec::new(&[0.1, 1.0], &["route"]);
        H.observe(&["/a"], 0.0625);
        H.observe(&["/a"], 0.5);
        H.observe(&["/a"], 4.0);
        let mut w = MetricWriter::default();
        H.write(&mut w, "x_seconds", "Time.");
        let text = w.finish();
        assert!(
            text.contains("x_seconds_bucket{route=\"/a\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{route=\"/a\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_bucket{route=\"/a\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("x_seconds_sum{route=\"/a\"} 4.5625\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_count{route=\"/a\"} 3\n"), "{text}");
        assert_eq!(H.count(&["/a"]), 3);
    }
}
