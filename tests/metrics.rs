//! `--metrics`: a receiver and a sender serving Prometheus metrics are
//! scraped before, during (the receiver stalled after the manifest by a
//! failpoint) and after a migration. Every scrape parses strictly as the
//! OpenMetrics text format; the series move as the migration does.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use migration_engine::metrics::exposition::{parse, Exposition};
use migration_testbed::ChildProcess;

/// GET /metrics from inside the network namespace `ns`; the body, checked.
fn scrape(ns: &str, addr: SocketAddr) -> (Exposition, String) {
    let mut conn = migration_testbed::connect_from(ns, addr).expect("connecting to the metrics address");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nAccept: application/openmetrics-text\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {answer}"));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: application/openmetrics-text; version=1.0.0"), "{head}");
    let parsed = parse(body).unwrap_or_else(|e| panic!("the scrape does not parse: {e}\n{body}"));
    (parsed, body.to_string())
}

fn value(e: &Exposition, text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    e.value(name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
}

#[test]
fn metrics_scraped_before_during_and_after_a_migration() {
    let Some(bed) = testbed("met") else { return };
    let (_src, id, token) = start_counter(&bed, "met");
    let (port, receiver_metrics, sender_metrics) = (port(), port(), port());
    let receiver_addr: SocketAddr = format!("127.0.0.1:{receiver_metrics}").parse().unwrap();
    let sender_addr: SocketAddr = format!("127.0.0.1:{sender_metrics}").parse().unwrap();
    let mut receiver = bed
        .spawn_receiver(port, &["--metrics", &receiver_addr.to_string()], &[("CTMIGRATE_FAILPOINTS", "receiver-after-manifest=sleep:4000")])
        .unwrap();
    let rx = |labels: &[(&'static str, &'static str)]| {
        let mut l = vec![("role", "receiver")];
        l.extend_from_slice(labels);
        l
    };

    // Before: every series there, at zero.
    let (before, text) = scrape(&bed.hosts.dst, receiver_addr);
    for result in ["ok", "rolled_back", "in_doubt", "refused", "failed"] {
        assert_eq!(value(&before, &text, "ctmigrate_migrations_total", &rx(&[("result", result)])), 0.0, "{result}");
    }
    assert_eq!(value(&before, &text, "ctmigrate_migrations_in_flight", &rx(&[])), 0.0);
    assert_eq!(value(&before, &text, "ctmigrate_frozen_seconds_count", &rx(&[])), 0.0);
    assert_eq!(value(&before, &text, "ctmigrate_wire_bytes_total", &rx(&[])), 0.0);

    // During: the receiver stalls after the manifest; both sides have the
    // migration in flight.
    let mut sender =
        ChildProcess::spawn(bed.send_command(&id, port, &["--metrics", &sender_addr.to_string(), "--mode", "stop-copy"])).unwrap();
    receiver.wait_for_event("start", Duration::from_secs(30)).unwrap_or_else(|e| panic!("no start: {e}: {}", receiver.stderr()));
    let (during, text) = scrape(&bed.hosts.dst, receiver_addr);
    assert_eq!(value(&during, &text, "ctmigrate_migrations_in_flight", &rx(&[])), 1.0, "{text}");
    assert_eq!(value(&during, &text, "ctmigrate_migrations_total", &rx(&[("result", "ok")])), 0.0);
    let (sending, stext) = scrape(&bed.hosts.src, sender_addr);
    assert_eq!(value(&sending, &stext, "ctmigrate_migrations_in_flight", &[("role", "sender")]), 1.0, "{stext}");
    eprintln!("SCRAPE receiver during the migration:\n{text}");

    let code = sender.wait(Duration::from_secs(120));
    assert_eq!(code, Some(0), "send failed: {}", sender.stderr());
    receiver.wait_for_event("result", Duration::from_secs(30)).unwrap();
    let dst = bed.dst_container(&id);
    let (tok, n) = read_counter(&dst.rootfs()).expect("counter on the destination");
    assert_eq!(tok, token, "restarted, not resumed");
    assert_counting_on(&dst.rootfs(), &token, n);

    // After: counted once, ok; bytes, frozen and total time recorded.
    let (after, text) = scrape(&bed.hosts.dst, receiver_addr);
    eprintln!("SCRAPE receiver after the migration:\n{text}");
    assert_eq!(value(&after, &text, "ctmigrate_migrations_total", &rx(&[("result", "ok")])), 1.0, "{text}");
    for result in ["rolled_back", "in_doubt", "refused", "failed"] {
        assert_eq!(value(&after, &text, "ctmigrate_migrations_total", &rx(&[("result", result)])), 0.0, "{result}");
    }
    assert_eq!(value(&after, &text, "ctmigrate_migrations_in_flight", &rx(&[])), 0.0);
    assert_eq!(value(&after, &text, "ctmigrate_rollbacks_total", &rx(&[])), 0.0);
    assert!(value(&after, &text, "ctmigrate_wire_bytes_total", &rx(&[])) > 0.0, "{text}");
    assert!(value(&after, &text, "ctmigrate_raw_bytes_total", &rx(&[])) > 0.0, "{text}");
    assert_eq!(value(&after, &text, "ctmigrate_frozen_seconds_count", &rx(&[])), 1.0, "{text}");
    let frozen = value(&after, &text, "ctmigrate_frozen_seconds_sum", &rx(&[]));
    assert!(frozen > 0.0 && frozen < 60.0, "frozen {frozen} s");
    assert_eq!(value(&after, &text, "ctmigrate_migration_seconds_count", &rx(&[])), 1.0);
    // The stall alone took 4 s.
    assert!(value(&after, &text, "ctmigrate_migration_seconds_sum", &rx(&[])) >= 4.0, "{text}");
    // The receiver's result says its frozen time too.
    let result = receiver.result().expect("the receiver's result").clone();
    assert!(result["frozen_ms"].as_u64().is_some_and(|f| f > 0), "{result}");

    // The sender's own: served while it ran; its result event matches.
    let sent = sender.result().expect("the sender's result").clone();
    assert_eq!(sent["ok"], true, "{sent}");

    // A second migration fails before its Commit: rolled back on both
    // sides, counted as such; the first one's series stay.
    let (src2, id2, token2) = start_counter(&bed, "met2");
    let sent = bed.run_sender(&id2, port, &["--mode", "stop-copy"], &[("CTMIGRATE_FAILPOINTS", "sender-before-commit=error")]).unwrap();
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert!(receiver.wait_until(Duration::from_secs(30), |e| e["event"] == "result" && e["ok"] == false), "{}", receiver.stderr());
    let (failed, text) = scrape(&bed.hosts.dst, receiver_addr);
    eprintln!("SCRAPE receiver after a rolled-back migration:\n{text}");
    assert_eq!(value(&failed, &text, "ctmigrate_migrations_total", &rx(&[("result", "ok")])), 1.0, "{text}");
    assert_eq!(value(&failed, &text, "ctmigrate_migrations_total", &rx(&[("result", "rolled_back")])), 1.0, "{text}");
    assert_eq!(value(&failed, &text, "ctmigrate_rollbacks_total", &rx(&[])), 1.0, "{text}");
    assert_eq!(value(&failed, &text, "ctmigrate_migrations_in_flight", &rx(&[])), 0.0);
    assert_eq!(value(&failed, &text, "ctmigrate_migration_seconds_count", &rx(&[])), 2.0);
    // Its copy never ran here: no frozen time of its own.
    assert_eq!(value(&failed, &text, "ctmigrate_frozen_seconds_count", &rx(&[])), 1.0);
    assert_source_runs(&bed, &src2, &token2);

    receiver.child.kill().ok();
    receiver.wait(Duration::from_secs(10));
    migration_testbed::force_remove(&bed.dst_runc, &id);
}
