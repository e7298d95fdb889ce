//! Printing API answers: tables and key/value lines for people, JSON for programs.

use serde_json::Value;

use crate::commands::Output;

/// How a column shows its value.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Text,
    Size,
    Percent,
}

/// A table column: header and a dotted path into each row.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    header: &'static str,
    path: &'static str,
    kind: Kind,
}

impl Column {
    /// A value shown as it is.
    pub const fn text(header: &'static str, path: &'static str) -> Column {
        Column {
            header,
            path,
            kind: Kind::Text,
        }
    }

    /// A byte count shown with a binary suffix.
    pub const fn size(header: &'static str, path: &'static str) -> Column {
        Column {
            header,
            path,
            kind: Kind::Size,
        }
    }

    /// A percentage.
    pub const fn percent(header: &'static str, path: &'static str) -> Column {
        Column {
            header,
            path,
            kind: Kind::Percent,
        }
    }

    fn render(&self, row: &Value) -> String {
        let mut v = row;
        for key in self.path.split('.') {
            v = &v[key];
        }
        match (self.kind, v) {
            (_, Value::Null) => "-".into(),
            (Kind::Size, Value::Number(n)) => {
                n.as_u64().map(human_size).unwrap_or_else(|| n.to_string())
            }
            (Kind::Percent, Value::Number(n)) => format!("{:.0}%", n.as_f64().unwrap_or(0.0)),
            (_, Value::String(s)) => s.clone(),
            (_, other) => other.to_string(),
        }
    }
}

/// 1.5G-style sizes.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["", "K", "M", "G", "T", "P"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[i])
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// Renders rows as an aligned table.
pub fn table(rows: &[Value], cols: &[Column]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| c.render(r)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<&str>| {
        let mut s = String::new();
        for (i, v) in vals.iter().enumerate() {
            if i + 1 == vals.len() {
                s.push_str(v);
            } else {
                s.push_str(&format!("{v:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(cols.iter().map(|c| c.header).collect());
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Prints a list the API answered with (an array; anything else prints as no rows).
pub fn print_array(v: &Value, output: Output, cols: &[Column]) {
    print_list(v.as_array().map(Vec::as_slice).unwrap_or(&[]), output, cols);
}

/// Prints a list.
pub fn print_list(rows: &[Value], output: Output, cols: &[Column]) {
    match output {
        Output::Json => println!("{}", Value::Array(rows.to_vec())),
        Output::Human => print!("{}", table(rows, cols)),
    }
}

/// Prints one object, after `headline` for people.
pub fn print_object(v: &Value, output: Output, headline: &str) {
    match output {
        Output::Json => println!("{v}"),
        Output::Human => {
            if !headline.is_empty() {
                println!("{headline}");
            }
            match v {
                Value::Object(map) => {
                    for (k, val) in map {
                        match val {
                            Value::String(s) => println!("  {k}: {s}"),
                            Value::Null => {}
                            other => println!("  {k}: {other}"),
                        }
                    }
                }
                Value::Null => {}
                other => println!(
                    "{}",
                    serde_json::to_string_pretty(other).unwrap_or_default()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_show_sizes() {
        let rows = vec![
            json!({"name": "vm-100-disk-0", "size": 34359738368u64, "m": {"p": 50.0}}),
            json!({"name": "a", "size": 1536}),
        ];
        let cols = [
            Column::text("NAME", "name"),
            Column::size("SIZE", "size"),
            Column::percent("P", "m.p"),
        ];
        let t = table(&rows, &cols);
        assert_eq!(
            t,
            "NAME           SIZE  P\nvm-100-disk-0  32G   50%\na              1.5K  -\n"
        );
    }
}
