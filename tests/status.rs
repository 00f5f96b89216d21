//! `status` output: golden tables from a fixed `/debug/services` document.

use std::time::Duration;

use kube_userspace_proxy::status::{render_table, StatusDoc};

fn doc() -> StatusDoc {
    serde_json::from_str(include_str!("golden/status.json")).unwrap()
}

#[test]
fn stats_table_matches_golden() {
    let out = render_table(&doc(), None);
    let golden = include_str!("golden/status.txt");
    assert_eq!(out, golden, "got:\n{out}");
}

#[test]
fn rate_table_shows_per_second_deltas() {
    let before = doc();
    let mut after = doc();
    after.services[0].accepted += 100;
    after.services[0].bytes_out += 2_000_000;
    after.services[0].endpoints[0].total += 50;
    let out = render_table(&after, Some((&before, Duration::from_secs(2))));
    let golden = include_str!("golden/status-rate.txt");
    assert_eq!(out, golden, "got:\n{out}");
}

#[test]
fn json_round_trips() {
    let d = doc();
    let text = serde_json::to_string(&d).unwrap();
    assert_eq!(serde_json::from_str::<StatusDoc>(&text).unwrap(), d);
}
