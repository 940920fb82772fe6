//! A receiver serves many connections at once and none can stall it:
//! peers that connect and say nothing (or half a TLS ClientHello) are
//! bounded and cut at the handshake's deadline while real migrations go
//! through; several migrations run at once, each admitted (destination id,
//! staging memory) before its source is frozen; a sender facing a receiver
//! that never answers gives up within its --timeout with one clear line.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use migration_testbed::{connect_from, ChildProcess, FixtureContainer};

/// A running counter fixture, its id and token.
fn counter(bed: &Testbed, name: &str) -> (FixtureContainer, String, String) {
    let id = format!("{name}-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);
    (src, id, token)
}

fn receiver_addr(bed: &Testbed, port: u16) -> SocketAddr {
    format!("{}:{port}", bed.hosts.dst_ip).parse().unwrap()
}

/// The first 100 bytes of a TLS 1.3 ClientHello: a handshake record header
/// announcing 512 bytes, the ClientHello's header, its version and random.
fn half_client_hello() -> Vec<u8> {
    let mut b = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    b.extend((0..89u8).map(|i| i.wrapping_mul(37)));
    assert_eq!(b.len(), 100);
    b
}

/// `idle` peers that connect and send nothing, and `half` that send half a
/// ClientHello, all from the destination host's own address (one IP, not
/// the sender's).
fn stallers(bed: &Testbed, addr: SocketAddr, idle: usize, half: usize) -> Vec<TcpStream> {
    let mut peers = Vec::new();
    let mut halves = 0;
    for i in 0..idle + half {
        let mut s = connect_from(&bed.hosts.dst, addr).expect("a staller connects");
        // Interleaved, so that both kinds hold places within the bound.
        if halves < half && (i % 2 == 0 || idle + half - i <= half - halves) {
            halves += 1;
            // The receiver may already have closed it (over a bound).
            let _ = s.write_all(&half_client_hello());
        }
        peers.push(s);
    }
    peers
}

/// How many of `peers` the receiver has closed (end of stream or reset).
fn closed_by_receiver(peers: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for p in peers.iter_mut() {
        p.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        closed += match p.read(&mut [0u8; 64]) {
            Ok(0) => 1,
            Ok(_) => 0,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => 0,
            Err(_) => 1,
        };
    }
    closed
}

/// Distinct sockets the process `pid` holds (fds duplicated for one socket
/// count once).
fn sockets_of(pid: u32) -> usize {
    use procfs::process::{FDTarget, Process};
    let Ok(fds) = Process::new(pid as i32).and_then(|p| p.fd()) else { return 0 };
    let inodes: std::collections::BTreeSet<u64> =
        fds.flatten().filter_map(|fd| if let FDTarget::Socket(inode) = fd.target { Some(inode) } else { None }).collect();
    inodes.len()
}

/// Samples `pid`'s socket count every 20 ms until stopped; the largest seen.
struct SocketSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl SocketSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut most = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(sockets_of(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        Self { stop, thread }
    }

    fn most(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Reads what the child has printed so far into its events.
fn drain(child: &mut ChildProcess) {
    let _ = child.wait_for_event("no-such-event", Duration::from_millis(200));
}

/// Asserts a migrated container counts on at the destination with its
/// token and its source is gone; then removes it, so that `assert_clean`
/// can check that nothing else was left (call it once every container
/// that landed is removed).
fn assert_landed(bed: &Testbed, src_id: &str, dest_id: &str, token: &str) {
    assert!(!bed.src_runc.exists(src_id).unwrap(), "source {src_id} still exists");
    let dst = bed.dst_container(dest_id);
    let (tok, n) = read_counter(&dst.rootfs()).expect("counter on the destination");
    assert_eq!(tok, token, "restarted, not resumed");
    assert_counting_on(&dst.rootfs(), token, n);
    migration_testbed::force_remove(&bed.dst_runc, dest_id);
    let _ = std::fs::remove_dir_all(bed.dst_bundles().join(dest_id));
}

fn assert_source_untouched(bed: &Testbed, src: &FixtureContainer, token: &str) {
    assert_eq!(frozen_state(bed, &src.id), "THAWED", "source frozen");
    let (tok, n) = read_counter(&src.rootfs()).unwrap();
    assert_eq!(tok, token);
    assert_counting_on(&src.rootfs(), token, n);
}

fn assert_one_clear_line(stderr: &str) {
    eprintln!("sender said: {}", stderr.trim());
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    for bad in ["os error 11", "Resource temporarily unavailable"] {
        assert!(!stderr.contains(bad), "{bad} shown: {stderr}");
    }
}

/// 50 idle peers and 20 stalled in their TLS handshake, from one address,
/// held open during a real migration (TLS or not): it completes, the
/// receiver keeps to its per-address bound (closing the peers over it at
/// once, the rest at the handshake deadline).
fn idle_peers_do_not_stall_a_migration(insecure: bool) {
    let Some(bed) = testbed(if insecure { "cii" } else { "cit" }) else { return };
    let (_src, id, token) = counter(&bed, "idle");
    let port = port();
    let security: &[&str] = if insecure { &["--insecure"] } else { &[] };
    let mut receiver = bed.spawn_receiver(port, &[&["--once"], security].concat(), &[]).unwrap();
    let pid = receiver.child.id();
    let sampler = SocketSampler::start(pid);
    let connected = Instant::now();
    let (idle, half) = if insecure { (50, 0) } else { (50, 20) };
    let mut peers = stallers(&bed, receiver_addr(&bed, port), idle, half);
    std::thread::sleep(Duration::from_millis(500));
    // Default bound: 8 handshakes per address; the rest closed at once.
    let closed = closed_by_receiver(&mut peers);
    assert!(connected.elapsed() < Duration::from_secs(9), "too slow to check before the handshake deadline");
    assert_eq!(closed, peers.len() - 8, "the receiver closes the peers over its per-address bound, keeps 8");

    let started = Instant::now();
    let sent = bed.run_sender(&id, port, &[&["--timeout", "20"], security].concat(), &[]).unwrap();
    let took = started.elapsed();
    assert_eq!(sent.code, Some(0), "send failed with {} stalled peers: {}", peers.len(), sent.stderr);
    // --once: the stalled handshakes do not hold the exit back until
    // their deadline (10 s after they connected).
    let exiting = Instant::now();
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "receiver: {}", receiver.stderr());
    assert!(exiting.elapsed() < Duration::from_secs(3), "the receiver took {:?} to exit", exiting.elapsed());
    let most = sampler.most();
    // Listener, the sender's connection, 8 handshakes, a little slack.
    assert!(most <= 8 + 4, "the receiver held {most} sockets at once");
    eprintln!("migration with {} stalled peers: {took:?}; at most {most} receiver sockets", peers.len());
    let rejected = receiver.events.iter().filter(|e| e["event"] == "rejected").count();
    assert_eq!(rejected, peers.len() - 8, "one event per connection closed at the bound");
    let audit = std::fs::read_to_string(bed.audit_log("dst")).unwrap();
    assert!(audit.lines().filter(|l| l.contains("--max-handshakes-per-ip 8")).count() >= peers.len() - 8, "{audit}");
    assert_landed(&bed, &id, &id, &token);
    assert_clean(&bed, &id);
    // The receiver is gone (--once); every peer's connection ended.
    assert_eq!(closed_by_receiver(&mut peers), peers.len());
}

#[test]
fn conc_idle_and_half_tls_peers_do_not_stall_a_migration() {
    idle_peers_do_not_stall_a_migration(false);
}

#[test]
fn conc_idle_peers_do_not_stall_an_insecure_migration() {
    idle_peers_do_not_stall_a_migration(true);
}

/// Over the bound in all, a connection is closed at once and its sender
/// says the receiver is busy; the handshake deadline then frees the places
/// the idle peers held, and the next sender goes through.
#[test]
fn conc_handshake_bound_refuses_then_deadline_frees_it() {
    let Some(bed) = testbed("cib") else { return };
    let (src, id, token) = counter(&bed, "bnd");
    let port = port();
    let extra = ["--once", "--max-handshakes", "16", "--max-handshakes-per-ip", "100", "--handshake-timeout", "4"];
    let mut receiver = bed.spawn_receiver(port, &extra, &[]).unwrap();
    let opened = Instant::now();
    let mut peers = stallers(&bed, receiver_addr(&bed, port), 30, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(closed_by_receiver(&mut peers), 14, "16 kept, the rest closed");
    let busy = bed.run_sender(&id, port, &["--timeout", "5"], &[]).unwrap();
    assert!(opened.elapsed() < Duration::from_secs(4), "the busy attempt came after the deadline");
    assert_eq!(busy.code, Some(3), "{}", busy.stderr);
    assert_one_clear_line(&busy.stderr);
    assert!(busy.stderr.contains(&format!("tcp://{}:{port}", bed.hosts.dst_ip)) && busy.stderr.contains("busy"), "{}", busy.stderr);
    assert_source_untouched(&bed, &src, &token);
    // At the deadline the receiver closes the idle peers.
    let all_closed = wait_for(Duration::from_secs(8), || (closed_by_receiver(&mut peers) == peers.len()).then_some(()));
    assert!(all_closed.is_some(), "the idle peers outlived --handshake-timeout");
    assert!(opened.elapsed() >= Duration::from_secs(4) - Duration::from_millis(300));
    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "the busy refusal did not count for --once: {}", receiver.stderr());
    assert_landed(&bed, &id, &id, &token);
    assert_clean(&bed, &id);
}

/// Before the peer is known, nothing larger than a Hello is read: a first
/// frame that claims 8 MiB is refused at once (without --insecure's peer
/// being able to make the receiver wait for, or allocate, its payload).
#[test]
fn conc_oversized_hello_is_refused_before_it_is_read() {
    let Some(bed) = testbed("cho") else { return };
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--insecure"], &[]).unwrap();
    let mut hello = Vec::new();
    {
        let mut w = migration_protocol::FrameWriter::new(&mut hello);
        let h = migration_protocol::Hello { min_version: 3, max_version: 3, software: "test".into() };
        w.write_json(migration_protocol::MessageKind::Hello, &h).unwrap();
        w.flush().unwrap();
    }
    // wire_len and raw_len (little-endian at 12 and 16): 8 MiB.
    for at in [12, 16] {
        hello[at..at + 4].copy_from_slice(&(8u32 << 20).to_le_bytes());
    }
    let mut peer = connect_from(&bed.hosts.src, receiver_addr(&bed, port)).unwrap();
    let started = Instant::now();
    peer.write_all(&hello[..24]).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let ended = peer.read(&mut [0u8; 16]);
    assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "closed only after {:?}", started.elapsed());
    let result = receiver.wait_for_event("result", Duration::from_secs(5)).unwrap();
    let error = result["error"].as_str().unwrap();
    assert!(error.contains("a Hello is at most"), "{result}");
    eprintln!("closed after {:?}: {error}", started.elapsed());
}

/// Two senders, two containers, one receiver, at the same time: both run
/// at once (both received before either finished) and both land.
#[test]
fn conc_two_migrations_at_once_both_land() {
    let Some(bed) = testbed("ctw") else { return };
    let (_a, id_a, tok_a) = counter(&bed, "twa");
    let (_b, id_b, tok_b) = counter(&bed, "twb");
    let port = port();
    // Each migration waits 3 s after its manifest: served one after the
    // other, they could not overlap.
    let mut receiver = bed.spawn_receiver(port, &[], &[("CTMIGRATE_FAILPOINTS", "receiver-after-manifest=sleep:3000")]).unwrap();
    let started = Instant::now();
    let mut a = ChildProcess::spawn(bed.send_command(&id_a, port, &[])).unwrap();
    let mut b = ChildProcess::spawn(bed.send_command(&id_b, port, &[])).unwrap();
    assert_eq!(a.wait(Duration::from_secs(60)), Some(0), "{}", a.stderr());
    assert_eq!(b.wait(Duration::from_secs(60)), Some(0), "{}", b.stderr());
    let took = started.elapsed();
    drain(&mut receiver);
    let order: Vec<&str> = receiver.events.iter().filter_map(|e| e["event"].as_str()).filter(|e| *e == "start" || *e == "result").collect();
    assert_eq!(&order[..2], ["start", "start"], "both migrations were under way at once: {order:?}");
    eprintln!("two migrations, each held 3 s, in {took:?}");
    assert_landed(&bed, &id_a, &id_a, &tok_a);
    assert_landed(&bed, &id_b, &id_b, &tok_b);
    assert_clean(&bed, &id_a);
    assert_clean(&bed, &id_b);
}

/// The staging budget fits one migration's reservation, not two: the
/// second is refused before its source freezes while the first lands.
#[test]
fn conc_reservation_over_the_staging_budget_is_refused_up_front() {
    let Some(bed) = testbed("cmb") else { return };
    let (_a, id_a, tok_a) = counter(&bed, "mba");
    let (b, id_b, tok_b) = counter(&bed, "mbb");
    // What one counter reserves (its resident memory, as the sender
    // measures it, and the restore's read block), and room for one and a
    // half.
    let pids = bed.src_runc.internal_state(&id_a).map(|st| container_runtime::Freezer::for_container(&st).unwrap().pids()).unwrap();
    let rss: u64 = pids
        .iter()
        .filter_map(|p| container_runtime::procinfo::status(*p)?.vmrss)
        .sum::<u64>()
        * 1024;
    let one = migration_engine::admission::reservation_bytes(rss);
    let budget = format!("{}", one + one / 2);
    eprintln!("counter resident {rss} bytes, reserves {one}; budget {budget}");
    let port = port();
    let receiver = bed
        .spawn_receiver(
            port,
            &["--stage-images", "memory", "--staging-memory", &budget],
            &[("CTMIGRATE_FAILPOINTS", "receiver-after-manifest=sleep:4000")],
        )
        .unwrap();
    let mut first = ChildProcess::spawn(bed.send_command(&id_a, port, &[])).unwrap();
    // Admitted and staged (its reserve written) before the second comes.
    wait_for(Duration::from_secs(20), || bed.dst_bundles().join(&id_a).join("config.json").exists().then_some(()))
        .expect("the first migration was never staged");
    let started = Instant::now();
    let second = bed.run_sender(&id_b, port, &[], &[]).unwrap();
    assert_eq!(second.code, Some(3), "{}", second.stderr);
    assert!(started.elapsed() < Duration::from_secs(3), "refused only after the first finished");
    assert_one_clear_line(&second.stderr);
    assert!(second.stderr.contains("--staging-memory"), "{}", second.stderr);
    assert_source_untouched(&bed, &b, &tok_b);
    assert_eq!(first.wait(Duration::from_secs(60)), Some(0), "{}", first.stderr());
    assert_landed(&bed, &id_a, &id_a, &tok_a);
    drop(receiver);
    assert_clean(&bed, &id_a);
    assert_clean(&bed, &id_b);
}

/// Two migrations to one destination id at once: the second is refused.
#[test]
fn conc_same_destination_id_twice_at_once_is_refused() {
    let Some(bed) = testbed("cdd") else { return };
    let (_a, id_a, tok_a) = counter(&bed, "dda");
    let (b, id_b, tok_b) = counter(&bed, "ddb");
    let dest = format!("dup-{}", bed.tag);
    let port = port();
    let receiver = bed.spawn_receiver(port, &[], &[("CTMIGRATE_FAILPOINTS", "receiver-after-manifest=sleep:4000")]).unwrap();
    let mut first = ChildProcess::spawn(bed.send_command(&id_a, port, &["--dest-id", &dest])).unwrap();
    wait_for(Duration::from_secs(20), || bed.dst_bundles().join(&dest).exists().then_some(())).expect("never staged");
    let started = Instant::now();
    let second = bed.run_sender(&id_b, port, &["--dest-id", &dest], &[]).unwrap();
    assert_eq!(second.code, Some(3), "{}", second.stderr);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_one_clear_line(&second.stderr);
    assert!(second.stderr.contains("already under way"), "{}", second.stderr);
    assert_source_untouched(&bed, &b, &tok_b);
    assert_eq!(first.wait(Duration::from_secs(60)), Some(0), "{}", first.stderr());
    assert_landed(&bed, &id_a, &dest, &tok_a);
    drop(receiver);
    assert_clean(&bed, &dest);
}

/// One migration more than --max-migrations is refused (the sender says
/// the receiver is busy, in one line, its source untouched) while the one
/// in flight lands.
#[test]
fn conc_one_over_max_migrations_is_refused() {
    let Some(bed) = testbed("cmm") else { return };
    let (_a, id_a, tok_a) = counter(&bed, "mma");
    let (b, id_b, tok_b) = counter(&bed, "mmb");
    let port = port();
    let receiver = bed
        .spawn_receiver(port, &["--max-migrations", "1"], &[("CTMIGRATE_FAILPOINTS", "receiver-after-manifest=sleep:4000")])
        .unwrap();
    let mut first = ChildProcess::spawn(bed.send_command(&id_a, port, &[])).unwrap();
    wait_for(Duration::from_secs(20), || bed.dst_bundles().join(&id_a).exists().then_some(())).expect("never staged");
    let started = Instant::now();
    let second = bed.run_sender(&id_b, port, &[], &[]).unwrap();
    assert_eq!(second.code, Some(3), "{}", second.stderr);
    assert!(started.elapsed() < Duration::from_secs(3), "refused only after the first finished");
    assert_one_clear_line(&second.stderr);
    assert!(second.stderr.contains("busy") && second.stderr.contains("--max-migrations 1"), "{}", second.stderr);
    assert_source_untouched(&bed, &b, &tok_b);
    assert_eq!(first.wait(Duration::from_secs(60)), Some(0), "{}", first.stderr());
    assert_landed(&bed, &id_a, &id_a, &tok_a);
    drop(receiver);
    assert_clean(&bed, &id_a);
    assert_clean(&bed, &id_b);
}

/// A TCP listener in the destination host that accepts and never reads.
fn black_hole(bed: &Testbed, port: u16) -> std::thread::JoinHandle<()> {
    let ns = format!("/run/netns/{}", bed.hosts.dst);
    let addr = receiver_addr(bed, port);
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = std::net::TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        let mut held = Vec::new();
        l.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(40);
        while Instant::now() < until {
            if let Ok((s, _)) = l.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    rx.recv().unwrap();
    t
}

/// A sender against a listener that never answers ends within its
/// --timeout with one clear line (TLS and not), its source untouched.
#[test]
fn conc_sender_timeout_covers_connect_tls_and_hello() {
    let Some(bed) = testbed("cst") else { return };
    let (src, id, token) = counter(&bed, "hole");
    let port = port();
    let _hole = black_hole(&bed, port);
    for extra in [&["--timeout", "3"][..], &["--timeout", "3", "--insecure"][..]] {
        let started = Instant::now();
        let mut sender = ChildProcess::spawn(bed.send_command(&id, port, extra)).unwrap();
        let code = sender.wait(Duration::from_secs(20));
        let took = started.elapsed();
        assert_eq!(code, Some(3), "{extra:?} after {took:?}: {}", sender.stderr());
        assert!(took < Duration::from_secs(7), "{extra:?}: {took:?} for --timeout 3");
        let stderr = sender.stderr();
        assert_one_clear_line(&stderr);
        assert!(stderr.contains(&format!("tcp://{}:{port}", bed.hosts.dst_ip)) && stderr.contains("--timeout"), "{stderr}");
        assert_source_untouched(&bed, &src, &token);
    }
    assert_clean(&bed, &id);
}

/// SIGTERM to a receiver with two migrations in flight rolls both back,
/// and the receiver exits 0 (a clean stop: nothing left in flight).
#[test]
fn conc_a_signal_rolls_back_every_migration_in_flight() {
    let Some(bed) = testbed("csg") else { return };
    let (a, id_a, tok_a) = counter(&bed, "sga");
    let (b, id_b, tok_b) = counter(&bed, "sgb");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &[], &[("CTMIGRATE_FAILPOINTS", "receiver-after-manifest=sleep:3000")]).unwrap();
    let mut sa = ChildProcess::spawn(bed.send_command(&id_a, port, &[])).unwrap();
    let mut sb = ChildProcess::spawn(bed.send_command(&id_b, port, &[])).unwrap();
    wait_for(Duration::from_secs(20), || {
        (bed.dst_bundles().join(&id_a).exists() && bed.dst_bundles().join(&id_b).exists()).then_some(())
    })
    .expect("both migrations staged at once");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(receiver.child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let code = receiver.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "receiver: {}", receiver.stderr());
    let results = receiver.events.iter().filter(|e| e["event"] == "result").count();
    assert_eq!(results, 2, "both migrations reported");
    assert!(
        receiver.events.iter().any(|e| e["event"] == "note" && e["message"].as_str().is_some_and(|m| m.contains("2 rolled back"))),
        "{:?}",
        receiver.events
    );
    for (sender, src, tok) in [(&mut sa, &a, &tok_a), (&mut sb, &b, &tok_b)] {
        let code = sender.wait(Duration::from_secs(60));
        assert!(matches!(code, Some(3 | 4)), "sender exit {code:?}: {}", sender.stderr());
        assert_source_untouched(&bed, src, tok);
    }
    assert_clean(&bed, &id_a);
    assert_clean(&bed, &id_b);
}

/// The same migration with and without 50 idle and 20 half-TLS peers,
/// interleaved, 3 runs each; prints the ratio of the total times.
#[test]
#[ignore]
fn bench_conc_idle_peers() {
    let Some(bed) = testbed("cbn") else { return };
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &[], &[]).unwrap();
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let (mut quiet, mut crowded) = (Vec::new(), Vec::new());
    for run in 0..runs * 2 {
        let with_peers = run % 2 == 1;
        let (_src, id, token) = counter(&bed, &format!("bn{run}"));
        let peers = with_peers.then(|| stallers(&bed, receiver_addr(&bed, port), 50, 20));
        let started = Instant::now();
        let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
        let took = started.elapsed();
        assert_eq!(sent.code, Some(0), "{}", sent.stderr);
        drop(peers);
        assert_landed(&bed, &id, &id, &token);
        assert_clean(&bed, &id);
        eprintln!("run {run} {}: {took:?}", if with_peers { "with 70 stalled peers" } else { "quiet" });
        if with_peers { crowded.push(took) } else { quiet.push(took) }
    }
    drain(&mut receiver);
    let total = |v: &[Duration]| v.iter().sum::<Duration>().as_secs_f64();
    let (q, c) = (total(&quiet), total(&crowded));
    println!(
        "bench_conc_idle_peers: quiet {:?}, with 50 idle + 20 half-TLS peers {:?}; total {q:.2} s vs {c:.2} s, ratio {:.2}",
        quiet, crowded, c / q
    );
    assert!(c / q < 1.5, "ratio {:.2}", c / q);
}
