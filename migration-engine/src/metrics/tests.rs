use super::exposition::parse;
use super::*;
use crate::precopy::RoundReport;

fn start(role: &'static str) -> Event {
    Event::Start { role, container: "c".into(), dest_id: "c".into(), peer: "p".into(), mode: "precopy".into(), mode_reason: None }
}

fn result(role: &'static str, ok: bool, exit_code: Option<i32>) -> Event {
    Event::Result(ResultEvent {
        ok,
        role,
        exit_code,
        frozen_ms: ok.then_some(420),
        total_ms: 3_500,
        bytes_sent: 1_000,
        bytes_raw: 4_000,
        ..Default::default()
    })
}

#[test]
fn a_fresh_registry_renders_every_series_at_zero_and_parses() {
    let m = Metrics::new(Role::Receiver);
    let text = m.render().unwrap();
    let e = parse(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
    for r in MigrationResult::ALL {
        assert_eq!(e.value("ctmigrate_migrations_total", &[("role", "receiver"), ("result", r.as_str())]), Some(0.0), "{text}");
    }
    for (name, kind) in [
        ("ctmigrate_migrations", "counter"),
        ("ctmigrate_frozen_seconds", "histogram"),
        ("ctmigrate_migration_seconds", "histogram"),
        ("ctmigrate_wire_bytes", "counter"),
        ("ctmigrate_raw_bytes", "counter"),
        ("ctmigrate_migrations_in_flight", "gauge"),
        ("ctmigrate_migrations_in_doubt", "gauge"),
        ("ctmigrate_precopy_rounds", "counter"),
        ("ctmigrate_rollbacks", "counter"),
    ] {
        let f = e.family(name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        assert_eq!(f.kind, kind, "{name}");
        assert!(f.help.as_deref().is_some_and(|h| !h.is_empty()), "{name} has no help");
    }
    assert_eq!(e.value("ctmigrate_migrations_in_flight", &[("role", "receiver")]), Some(0.0));
    assert_eq!(e.value("ctmigrate_frozen_seconds_count", &[("role", "receiver")]), Some(0.0));
    assert_eq!(e.value("ctmigrate_frozen_seconds_bucket", &[("role", "receiver"), ("le", "+Inf")]), Some(0.0));
}

#[test]
fn events_move_the_series() {
    let m = Metrics::new(Role::Sender);
    m.observe(&start("sender"));
    let mid = parse(&m.render().unwrap()).unwrap();
    assert_eq!(mid.value("ctmigrate_migrations_in_flight", &[("role", "sender")]), Some(1.0));
    m.observe(&Event::Round(RoundReport::new(1, "pre-dump", 4096, Duration::from_millis(10), &[])));
    m.observe(&Event::Round(RoundReport::new(1, "pre-dump", 4096, Duration::from_millis(10), &[])));
    m.observe(&result("sender", true, None));
    // A second one rolls back (twice through the rollback phase: counted once).
    m.observe(&start("sender"));
    m.observe(&Event::Phase { phase: Phase::Rollback, elapsed_ms: 1 });
    m.observe(&Event::Phase { phase: Phase::Rollback, elapsed_ms: 2 });
    m.observe(&result("sender", false, Some(4)));
    let text = m.render().unwrap();
    let e = parse(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
    let v = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("role", "sender")];
        labels.extend_from_slice(extra);
        e.value(name, &labels).unwrap_or_else(|| panic!("no {name} {extra:?} in\n{text}"))
    };
    assert_eq!(v("ctmigrate_migrations_total", &[("result", "ok")]), 1.0);
    assert_eq!(v("ctmigrate_migrations_total", &[("result", "rolled_back")]), 1.0);
    assert_eq!(v("ctmigrate_migrations_in_flight", &[]), 0.0);
    assert_eq!(v("ctmigrate_precopy_rounds_total", &[]), 2.0);
    assert_eq!(v("ctmigrate_rollbacks_total", &[]), 1.0);
    assert_eq!(v("ctmigrate_wire_bytes_total", &[]), 2_000.0);
    assert_eq!(v("ctmigrate_raw_bytes_total", &[]), 8_000.0);
    assert_eq!(v("ctmigrate_frozen_seconds_count", &[]), 1.0);
    assert!((v("ctmigrate_frozen_seconds_sum", &[]) - 0.42).abs() < 1e-9);
    assert_eq!(v("ctmigrate_frozen_seconds_bucket", &[("le", "0.3")]), 0.0);
    assert_eq!(v("ctmigrate_frozen_seconds_bucket", &[("le", "0.5")]), 1.0);
    assert_eq!(v("ctmigrate_migration_seconds_count", &[]), 2.0);
}

#[test]
fn results_map_to_labels_and_refusals_before_a_start_are_not_in_flight() {
    let m = Metrics::new(Role::Receiver);
    // Refused at the handshake: no start, counted, not timed.
    m.observe(&result("receiver", false, Some(3)));
    for (code, label) in [(Some(5), "failed"), (Some(6), "in_doubt"), (None, "failed"), (Some(4), "rolled_back")] {
        m.observe(&start("receiver"));
        m.observe(&result("receiver", false, code));
        let e = parse(&m.render().unwrap()).unwrap();
        assert!(e.value("ctmigrate_migrations_total", &[("role", "receiver"), ("result", label)]).unwrap() >= 1.0, "{code:?}");
    }
    let e = parse(&m.render().unwrap()).unwrap();
    assert_eq!(e.value("ctmigrate_migrations_total", &[("role", "receiver"), ("result", "refused")]), Some(1.0));
    assert_eq!(e.value("ctmigrate_migrations_total", &[("role", "receiver"), ("result", "failed")]), Some(2.0));
    assert_eq!(e.value("ctmigrate_migrations_in_flight", &[("role", "receiver")]), Some(0.0));
    assert_eq!(e.value("ctmigrate_migration_seconds_count", &[("role", "receiver")]), Some(4.0));
    // The receiver's rollback: its staged copy removed (exit 4).
    assert_eq!(e.value("ctmigrate_rollbacks_total", &[("role", "receiver")]), Some(1.0));
}

#[test]
fn migrations_on_several_threads_are_in_flight_at_once() {
    let m = Arc::new(Metrics::new(Role::Receiver));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = Arc::new(Mutex::new(go_rx));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (m, started_tx, go_rx) = (m.clone(), started_tx.clone(), go_rx.clone());
            std::thread::spawn(move || {
                m.observe(&start("receiver"));
                started_tx.send(()).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
                m.observe(&result("receiver", true, None));
            })
        })
        .collect();
    for _ in 0..3 {
        started_rx.recv().unwrap();
    }
    let e = parse(&m.render().unwrap()).unwrap();
    assert_eq!(e.value("ctmigrate_migrations_in_flight", &[("role", "receiver")]), Some(3.0));
    for _ in 0..3 {
        go_tx.send(()).unwrap();
    }
    threads.into_iter().for_each(|t| t.join().unwrap());
    let e = parse(&m.render().unwrap()).unwrap();
    assert_eq!(e.value("ctmigrate_migrations_in_flight", &[("role", "receiver")]), Some(0.0));
    assert_eq!(e.value("ctmigrate_migrations_total", &[("role", "receiver"), ("result", "ok")]), Some(3.0));
}

#[test]
fn in_doubt_goes_up_and_down() {
    let m = Metrics::new(Role::Sender);
    m.in_doubt_began(Role::Sender);
    let e = parse(&m.render().unwrap()).unwrap();
    assert_eq!(e.value("ctmigrate_migrations_in_doubt", &[("role", "sender")]), Some(1.0));
    m.in_doubt_settled(Role::Sender);
    let e = parse(&m.render().unwrap()).unwrap();
    assert_eq!(e.value("ctmigrate_migrations_in_doubt", &[("role", "sender")]), Some(0.0));
}

#[test]
fn the_responder_answers_get_metrics_and_nothing_else() {
    use std::io::Read;
    let m = Arc::new(Metrics::new(Role::Receiver));
    m.observe(&start("receiver"));
    let server = serve("127.0.0.1:0", m.clone()).unwrap();
    let get = |request: &str| {
        let mut c = TcpStream::connect(server.local_addr()).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    };
    let answer = get("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains(&format!("Content-Type: {CONTENT_TYPE}")), "{head}");
    assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
    let e = parse(body).unwrap();
    assert_eq!(e.value("ctmigrate_migrations_in_flight", &[("role", "receiver")]), Some(1.0));
    assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    let addr = server.local_addr();
    drop(server);
    assert!(TcpStream::connect(addr).is_err(), "still listening after drop");
}

#[test]
fn a_taken_port_or_a_bad_address_is_a_typed_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let m = Arc::new(Metrics::new(Role::Sender));
    assert!(matches!(serve(&addr, m.clone()), Err(MetricsError::Bind { .. })));
    assert!(matches!(serve("not an address", m), Err(MetricsError::BadAddress(_))));
}

#[test]
fn the_parser_refuses_what_is_not_well_formed() {
    let good = "# HELP a_total x\n# TYPE a counter\na_total{role=\"s\"} 1\n# EOF\n";
    // `a_total` is a sample of family `a`: declared as `a`.
    let good = good.replace("# HELP a_total x", "# HELP a x");
    assert!(parse(&good).is_ok());
    for bad in [
        "# TYPE a counter\na_total 1\n",                                 // no EOF
        "# TYPE a counter\na_total 1\n# EOF\nb 1\n",                     // after EOF
        "# TYPE a counter\na_total -1\n# EOF\n",                         // negative counter
        "# TYPE a counter\na 1\n# EOF\n",                                // counter without _total
        "# TYPE a gauge\na{x=\"1} 1\n# EOF\n",                           // unclosed label
        "# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n# EOF\n",                 // label twice
        "# TYPE a gauge\na{x=\"\\t\"} 1\n# EOF\n",                       // bad escape
        "# TYPE a gauge\na one\n# EOF\n",                                // not a number
        "b 1\n# EOF\n",                                                  // undeclared
        "# TYPE a gauge\n# TYPE a gauge\n# EOF\n",                       // declared twice
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\n# EOF\n",             // not contiguous
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 1\n# EOF\n", // falling
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\nh_sum 1\n# EOF\n", // no +Inf
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 2\nh_sum 1\n# EOF\n", // count differs
        "# TYPE a gauge\na 1\n# EOF",                                    // no final newline
    ] {
        assert!(parse(bad).is_err(), "accepted:\n{bad}");
    }
}
