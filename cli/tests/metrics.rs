//! `GET /api/metrics`: Prometheus text that Prometheus's own checker (`promtool check metrics`,
//! Debian's prometheus package) accepts, with the figures a monitoring user looks for after
//! real work: pool usage, per-volume I/O counters, jobs, backup ages and HTTP latencies.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{require_tool, start_job, succeed, Server};
use serde_json::json;

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn metrics_pass_promtool_and_count_real_work() {
    require_tool("promtool");
    let srv = Server::start();
    let c = srv.client();

    // Work to count: a thin volume, written by a convert, read by a backup.
    let r = c
        .request(
            "POST",
            "/api/volumes",
            Some(&json!({"vg": "strata", "name": "metered", "size": "16M", "pool": "data"})),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let pattern: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let r = c
        .send(
            "PUT",
            "/api/images/pattern.raw/upload?format=raw&source_format=raw",
            pattern.clone(),
            false,
        )
        .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.body);
    succeed(&c, r.body["id"].as_str().unwrap());
    let id = start_job(
        &c,
        "/api/convert",
        &json!({"source": "image:pattern.raw", "target": "lv:strata/metered"}),
    );
    succeed(&c, &id);
    let id = start_job(&c, "/api/backups", &json!({"source": "lv:strata/metered"}));
    succeed(&c, &id);

    // Unauthenticated requests get nothing.
    let anon = srv.client_with(None);
    assert_eq!(
        anon.request("GET", "/api/metrics", None).unwrap().status,
        401
    );

    let r = c.request("GET", "/api/metrics", None).unwrap();
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.raw.clone()).unwrap();

    // promtool reads the text from stdin and exits non-zero on format errors and on
    // naming-convention problems.
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&r.raw).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The figures reflect the work done.
    let written = sample(&text, "strata_volume_written_bytes_total", &["metered"])
        .unwrap_or_else(|| panic!("no write counter for the volume:\n{text}"));
    assert!(written >= pattern.len() as f64, "{written}\n{text}");
    let read = sample(&text, "strata_volume_read_bytes_total", &["metered"])
        .unwrap_or_else(|| panic!("no read counter for the volume:\n{text}"));
    assert!(read >= pattern.len() as f64, "{read}\n{text}");
    let used = sample(&text, "strata_pool_data_used_bytes", &["pool=\"data\""])
        .unwrap_or_else(|| panic!("no pool usage:\n{text}"));
    assert!(used > 0.0, "{text}");
    let finished = sample(&text, "strata_jobs_finished_total", &["backup"])
        .unwrap_or_else(|| panic!("no finished backup jobs:\n{text}"));
    assert!(finished >= 1.0, "{text}");
    let age = sample(&text, "strata_backup_age_seconds", &["metered"])
        .unwrap_or_else(|| panic!("no backup age:\n{text}"));
    assert!((0.0..3600.0).contains(&age), "{age}");
    assert!(
        sample(
            &text,
            "strata_http_request_duration_seconds_count",
            &["route=\"/api/backups\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

strata_testkit::main!(metrics_pass_promtool_and_count_real_work,);
