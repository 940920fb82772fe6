//! The migration benchmark (run by hand, `#[ignore]`d): ctmigrate against
//! what users do today and against the floor, in one run, on the same
//! fixtures and the same two network-namespace hosts. See
//! docs/performance.md for the command and the figures.
//!
//! Methods, each timed from the start of its freeze/dump to the end of its
//! restore (its own clock), and by the fixture (the longest gap in a
//! heartbeat it keeps every 2 ms):
//! - `ctmigrate`: a stop-copy migration over TLS (`frozen_ms`); at the
//!   variant size also with `--compress never` and with `--insecure`;
//! - `by-hand`: `runc checkpoint` to a directory, `tar | zstd` over a TCP
//!   connection between the hosts, unpack, `runc restore`;
//! - `page-server`: `runc checkpoint --page-server` to `criu page-server`
//!   on the destination, the other images over TCP, `runc restore`;
//! - `floor`: `runc checkpoint` to tmpfs and `runc restore` from it on one
//!   host, no network.
//!
//! And the raw link: TCP throughput between the hosts.
//!
//! `bench_image_pipeline` measures the image pipeline alone (streamer,
//! TLS or plain TCP, sink) against the raw link over loopback.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use migration_testbed::{connect_from, HostPair};

#[derive(Debug, Clone, Copy)]
struct Fixture {
    mib: u64,
    dirty_kib_per_s: u64,
    compressible: bool,
}

impl Fixture {
    fn name(&self) -> String {
        format!("{}MiB-{}-dirty{}KiBps", self.mib, if self.compressible { "compressible" } else { "random" }, self.dirty_kib_per_s)
    }

    fn workload(&self) -> Workload {
        let (mib, dirty_kib_per_s) = (self.mib, self.dirty_kib_per_s);
        if self.compressible {
            Workload::CompressiblePattern { mib, dirty_kib_per_s }
        } else {
            Workload::Pattern { mib, dirty_kib_per_s }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Ctmigrate,
    /// ctmigrate with `--compress never`.
    CtmigrateNoCompression,
    /// ctmigrate over plain TCP (`--insecure` on both sides): what TLS
    /// costs in the frozen window. Run at the variant size only.
    CtmigrateInsecure,
    /// ctmigrate `--mode postcopy`: frozen until the copy runs, memory
    /// after.
    CtmigratePostcopy,
    ByHand,
    PageServer,
    Floor,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Ctmigrate => "ctmigrate",
            Method::CtmigrateNoCompression => "ctmigrate-compress-never",
            Method::CtmigrateInsecure => "ctmigrate-insecure",
            Method::CtmigratePostcopy => "ctmigrate-postcopy",
            Method::ByHand => "by-hand",
            Method::PageServer => "page-server",
            Method::Floor => "floor",
        }
    }
}

/// One migration's figures.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Sample {
    frozen_ms: u64,
    heartbeat_gap_ms: u64,
    total_ms: u64,
    wire_bytes: u64,
    image_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frozen_phases: Option<serde_json::Value>,
    /// Post-copy: the result's `postcopy`, and the destination's
    /// heartbeat rate while pages still arrived, against the source's
    /// before the migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    postcopy: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_rate_while_arriving: Option<f64>,
}

/// The source host's end of the test link limited to `mbit` by a token
/// bucket (`tc qdisc ... tbf`), until dropped.
struct ShapedLink {
    netns: String,
    dev: String,
}

impl ShapedLink {
    fn new(bed: &Testbed, mbit: u64) -> Self {
        let shaped = ShapedLink { netns: bed.hosts.src.clone(), dev: format!("{}s", bed.tag) };
        run_ok(
            Command::new("ip").args(["netns", "exec", &shaped.netns, "tc", "qdisc", "add", "dev", &shaped.dev, "root", "tbf"]).args([
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "256kb",
                "latency",
                "20ms",
            ]),
            "tc qdisc add tbf",
        );
        shaped
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "exec", &self.netns, "tc", "qdisc", "del", "dev", &self.dev, "root"]).status();
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output().unwrap();
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
}

fn dir_bytes(dir: &Path) -> u64 {
    walk(dir).iter().map(|p| p.metadata().map(|m| m.len()).unwrap_or(0)).sum()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A listener inside the destination host's namespace.
fn listen_in(ns: &str, addr: SocketAddr) -> TcpListener {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        nix::sched::setns(std::fs::File::open(&path).unwrap(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpListener::bind(addr).unwrap()
    })
    .join()
    .unwrap()
}

/// Pipes `producer`'s stdout (run here) over one TCP connection from the
/// source host to the destination host into `consumer`'s stdin. Returns
/// the bytes that crossed the connection.
fn tcp_pipe(bed: &Testbed, port: u16, mut producer: Command, mut consumer: Command) -> u64 {
    let addr: SocketAddr = format!("{}:{port}", bed.hosts.dst_ip).parse().unwrap();
    let listener = listen_in(&bed.hosts.dst, addr);
    let mut consumer = consumer.stdin(Stdio::piped()).spawn().unwrap();
    let mut sink = consumer.stdin.take().unwrap();
    let receiving = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        // tar stops reading at its end-of-archive blocks and may leave the
        // producer's final padding unread; its exit status is what counts.
        match std::io::copy(&mut conn, &mut sink) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            other => {
                other.unwrap();
            }
        }
    });
    let mut producer = producer.stdout(Stdio::piped()).spawn().unwrap();
    let mut conn = connect_from(&bed.hosts.src, addr).unwrap();
    let bytes = std::io::copy(producer.stdout.as_mut().unwrap(), &mut conn).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(producer.wait().unwrap().success(), "the pipe's producer failed");
    receiving.join().unwrap();
    assert!(consumer.wait().unwrap().success(), "the pipe's consumer failed");
    bytes
}

/// A source fixture, running and verified once, and a copy of its bundle
/// with its own cgroup for the baselines to restore into.
struct Prepared {
    src: migration_testbed::FixtureContainer,
    id: String,
    copy: PathBuf,
}

fn prepare(bed: &Testbed, fixture: Fixture) -> Prepared {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let id = format!("b{}-{}-{}", fixture.mib, NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), bed.tag);
    let src = bed.start_fixture(&id, &fixture.workload()).unwrap();
    wait_for(Duration::from_secs(120), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 1)).expect("the fixture never verified");
    let copy = bed.dir.join(format!("{id}-restored"));
    assert!(Command::new("cp").arg("-a").arg(&src.bundle).arg(&copy).status().unwrap().success());
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(copy.join("config.json")).unwrap()).unwrap();
    cfg["linux"]["cgroupsPath"] = format!("{}/{id}-r", bed.cgroup_parent).into();
    std::fs::write(copy.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    Prepared { src, id, copy }
}

/// Waits for the restored fixture to verify its memory again; returns its
/// longest heartbeat gap in ms.
fn restored_gap_ms(rootfs: &Path, token: &str) -> u64 {
    let before = read_pattern_status(rootfs).map(|s| s.passes).unwrap_or(0);
    let st = wait_for(Duration::from_secs(120), || read_pattern_status(rootfs).filter(|s| s.passes >= before + 2))
        .unwrap_or_else(|| panic!("the restored fixture in {} did not verify", rootfs.display()));
    assert!(st.ok && st.token == token, "restored fixture: {}", st.line);
    st.max_gap_us / 1000
}

fn runc_in(bed: &Testbed, netns: Option<&str>, root: &Path) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = HostPair::command_in(ns, &bed.runc_binary);
            c.arg("--root").arg(root);
            c
        }
        None => {
            let mut c = Command::new(&bed.runc_binary);
            c.arg("--root").arg(root);
            c
        }
    };
    c.stdin(Stdio::null());
    c
}

/// A tmpfs for the baselines' images, mounted once per testbed (removed
/// with the testbed's directory after a lazy unmount at the end).
fn scratch_dir(bed: &Testbed) -> PathBuf {
    let dir = bed.dir.join("scratch");
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", "size=12g", "tmpfs"]).arg(&dir), "mounting the scratch tmpfs");
    }
    dir
}

fn run_method(bed: &Testbed, fixture: Fixture, method: Method) -> Sample {
    let p = prepare(bed, fixture);
    let token = read_pattern_status(&p.src.rootfs()).unwrap().token;
    // The baselines' images live on tmpfs (the floor is defined so, and it
    // is the best case for the others), like ctmigrate's by default.
    let images = scratch_dir(bed).join(format!("{}-images", p.id));
    let images_dst = scratch_dir(bed).join(format!("{}-images-dst", p.id));
    std::fs::create_dir_all(&images_dst).unwrap();
    let restored_id = format!("{}-r", p.id);
    let restore = |bed: &Testbed| {
        run_ok(
            runc_in(bed, None, &bed.dst_runc.root)
                .args(["restore", "-d", "--auto-dedup", "--image-path"])
                .arg(&images_dst)
                .arg("--bundle")
                .arg(&p.copy)
                .arg(&restored_id),
            "runc restore",
        )
    };
    // The baselines get the memory treatment ctmigrate gives itself: the
    // restore punches pages out of the images as it reads them
    // (--auto-dedup, above), and image memory is touched just before the
    // checkpoint (ctmigrate holds a touched reserve until CRIU starts). On
    // this VM fresh memory costs several times more than memory just freed
    // (see fresh_memory_ms_per_gib), so without this the floor would not be
    // a floor.
    if !matches!(method, Method::Ctmigrate | Method::CtmigrateNoCompression | Method::CtmigrateInsecure | Method::CtmigratePostcopy) {
        // The same reserve ctmigrate uses, written and dropped at once.
        drop(migration_engine::scratch::Reserve::create(&scratch_dir(bed), fixture.mib << 20).unwrap());
    }
    let mut sample = Sample::default();
    let started = Instant::now();
    let restored_rootfs = match method {
        Method::Ctmigrate | Method::CtmigrateNoCompression | Method::CtmigrateInsecure | Method::CtmigratePostcopy => {
            let port = port();
            let insecure = method == Method::CtmigrateInsecure;
            let postcopy = method == Method::CtmigratePostcopy;
            let mut receiver = bed.spawn_receiver(port, if insecure { &["--once", "--insecure"] } else { &["--once"] }, &[]).unwrap();
            let mut extra = vec!["--mode", if postcopy { "postcopy" } else { "stop-copy" }, "--dest-id", &restored_id];
            let source_rate = postcopy.then(|| beat_rate(&p.src.rootfs(), Duration::from_secs(2)));
            let beats = postcopy.then(|| BeatSampler::start(bed.dst_bundles().join(&restored_id).join("rootfs")));
            if method == Method::CtmigrateNoCompression {
                extra.extend(["--compress", "never"]);
            }
            if insecure {
                extra.push("--insecure");
            }
            let sent = bed.run_sender(&p.id, port, &extra, &[]).unwrap();
            assert_eq!(sent.code, Some(0), "{}", sent.stderr);
            assert_eq!(receiver.wait(Duration::from_secs(300)), Some(0));
            let r = sent.result().unwrap();
            sample.frozen_ms = r["frozen_ms"].as_u64().unwrap();
            sample.total_ms = r["total_ms"].as_u64().unwrap();
            sample.wire_bytes = r["bytes_sent"].as_u64().unwrap();
            sample.image_bytes = r["image_bytes"].as_u64().unwrap();
            sample.frozen_phases = Some(r["frozen_phases"].clone());
            if let (Some(beats), Some(source_rate)) = (beats, source_rate) {
                sample.postcopy = Some(r["postcopy"].clone());
                sample.heartbeat_rate_while_arriving = beats.finish().map(|rate| (rate / source_rate * 100.0).round() / 100.0);
            }
            sample.usage = Some(serde_json::json!({"sender": r["usage"], "receiver": receiver.result().map(|r| r["usage"].clone())}));
            bed.dst_bundles().join(&restored_id).join("rootfs")
        }
        Method::ByHand => {
            run_ok(runc_in(bed, None, &bed.src_runc.root).args(["checkpoint", "--image-path"]).arg(&images).arg(&p.id), "runc checkpoint");
            let mut producer = Command::new("sh");
            producer.arg("-c").arg(format!("tar -C {} -cf - . | zstd -1 -T0 -q -c", images.display()));
            let mut consumer = Command::new("sh");
            consumer.arg("-c").arg(format!("zstd -d -q -c | tar -C {} -xf -", images_dst.display()));
            sample.wire_bytes = tcp_pipe(bed, port(), producer, consumer);
            restore(bed);
            sample.frozen_ms = started.elapsed().as_millis() as u64;
            sample.image_bytes = dir_bytes(&images);
            p.copy.join("rootfs")
        }
        Method::PageServer => {
            let port = port();
            let mut server = HostPair::command_in(&bed.hosts.dst, "criu")
                .args(["page-server", "--images-dir"])
                .arg(&images_dst)
                .args(["--address", &bed.hosts.dst_ip, "--port", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Wait until it listens (without connecting: it serves one dump).
            wait_for(Duration::from_secs(10), || {
                let out = HostPair::command_in(&bed.hosts.dst, "ss").args(["-Hltn", &format!("sport = :{port}")]).output().ok()?;
                (!out.stdout.is_empty()).then_some(())
            })
            .expect("criu page-server never listened");
            let started_ps = Instant::now();
            run_ok(
                runc_in(bed, Some(&bed.hosts.src), &bed.src_runc.root)
                    .args(["checkpoint", "--page-server", &format!("{}:{port}", bed.hosts.dst_ip), "--image-path"])
                    .arg(&images)
                    .arg(&p.id),
                "runc checkpoint --page-server",
            );
            assert!(server.wait().unwrap().success(), "criu page-server failed");
            let mut producer = Command::new("tar");
            producer.arg("-C").arg(&images).args(["-cf", "-", "."]);
            let mut consumer = Command::new("tar");
            consumer.arg("-C").arg(&images_dst).arg("-xf").arg("-");
            let other = tcp_pipe(bed, port + 1000, producer, consumer);
            restore(bed);
            sample.frozen_ms = started_ps.elapsed().as_millis() as u64;
            sample.image_bytes = dir_bytes(&images_dst);
            sample.wire_bytes = dir_bytes(&images_dst) - dir_bytes(&images) + other;
            p.copy.join("rootfs")
        }
        Method::Floor => {
            run_ok(runc_in(bed, None, &bed.src_runc.root).args(["checkpoint", "--image-path"]).arg(&images_dst).arg(&p.id), "runc checkpoint");
            let checkpoint_ms = started.elapsed().as_millis() as u64;
            restore(bed);
            // The floor's two halves, to set against ctmigrate's phases.
            sample.frozen_phases = Some(serde_json::json!({
                "checkpoint_ms": checkpoint_ms,
                "restore_ms": started.elapsed().as_millis() as u64 - checkpoint_ms,
            }));
            sample.frozen_ms = started.elapsed().as_millis() as u64;
            sample.image_bytes = dir_bytes(&images_dst);
            p.copy.join("rootfs")
        }
    };
    if sample.total_ms == 0 {
        sample.total_ms = started.elapsed().as_millis() as u64;
    }
    sample.heartbeat_gap_ms = restored_gap_ms(&restored_rootfs, &token);
    drop(bed.dst_container(&restored_id));
    drop(p.src);
    for d in [&images, &images_dst, &p.copy] {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_dir_all(bed.dst_bundles().join(&restored_id));
    sample
}

/// The pattern fixture's heartbeats per second in `rootfs`, over `over`.
fn beat_rate(rootfs: &Path, over: Duration) -> f64 {
    let first = migration_testbed::read_pattern_beat(rootfs).map(|(_, n)| n).unwrap_or(0);
    let started = Instant::now();
    std::thread::sleep(over);
    let last = migration_testbed::read_pattern_beat(rootfs).map(|(_, n)| n).unwrap_or(0);
    (last - first) as f64 / started.elapsed().as_secs_f64()
}

/// Samples a restored fixture's heartbeat file while a post-copy
/// migration runs: its rate from the first beat seen on the destination
/// to the end of the migration (every page there).
struct BeatSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<f64>>,
}

impl BeatSampler {
    fn start(rootfs: PathBuf) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut first: Option<(Instant, u64)> = None;
            let mut seen = None;
            let mut last = (Instant::now(), 0);
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some((_, n)) = migration_testbed::read_pattern_beat(&rootfs) {
                    match seen {
                        // The copied file first; its first change is the copy running.
                        None => seen = Some(n),
                        Some(s) if n > s && first.is_none() => first = Some((Instant::now(), n)),
                        _ => {}
                    }
                    last = (Instant::now(), n);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let (t0, n0) = first?;
            let secs = last.0.duration_since(t0).as_secs_f64();
            (secs > 0.2).then(|| (last.1 - n0) as f64 / secs)
        });
        Self { stop, thread }
    }

    fn finish(self) -> Option<f64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// Post-copy against stop-copy and the floor, in one run (interleaved):
/// frozen time as the fixture feels it (its longest heartbeat gap), the
/// time until every page is on the destination, and the destination's
/// heartbeat rate while pages still arrive. Sizes with
/// CTMIGRATE_BENCH_SIZES (default 64,1024,2048), runs with
/// CTMIGRATE_BENCH_RUNS (default 3).
/// `cargo test --release --test bench -- --ignored bench_postcopy --nocapture`
#[test]
#[ignore = "benchmark: run by hand, see docs/performance.md"]
fn bench_postcopy() {
    let bed = testbed("bpc").expect("root prerequisites");
    let sizes: Vec<u64> = std::env::var("CTMIGRATE_BENCH_SIZES")
        .map(|s| s.split(',').map(|v| v.trim().parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![64, 1024, 2048]);
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").map(|v| v.parse().unwrap()).unwrap_or(3);
    let methods = [Method::Ctmigrate, Method::CtmigratePostcopy, Method::Floor];
    let mut samples: std::collections::BTreeMap<(u64, &str), Vec<Sample>> = Default::default();
    for run in 0..runs {
        for &mib in &sizes {
            for m in methods {
                let fixture = Fixture { mib, dirty_kib_per_s: 1024, compressible: false };
                let s = run_method(&bed, fixture, m);
                eprintln!("{mib} MiB {} run {run}: gap {} ms, frozen {} ms, postcopy {:?}, rate {:?}", m.name(), s.heartbeat_gap_ms, s.frozen_ms, s.postcopy, s.heartbeat_rate_while_arriving);
                samples.entry((mib, m.name())).or_default().push(s);
            }
        }
    }
    let med = |mib: u64, m: Method, f: &dyn Fn(&Sample) -> u64| median(samples[&(mib, m.name())].iter().map(f).collect());
    let mut results = serde_json::Map::new();
    for &mib in &sizes {
        let gap = |m| med(mib, m, &|s| s.heartbeat_gap_ms);
        let all_pages = med(mib, Method::CtmigratePostcopy, &|s| s.postcopy.as_ref().and_then(|p| p["all_pages_after_run_ms"].as_u64()).unwrap_or(0));
        let rates: Vec<u64> = samples[&(mib, Method::CtmigratePostcopy.name())].iter().filter_map(|s| s.heartbeat_rate_while_arriving).map(|r| (r * 100.0) as u64).collect();
        results.insert(
            format!("{mib}MiB"),
            serde_json::json!({
                "gap_ms": {"stop-copy": gap(Method::Ctmigrate), "postcopy": gap(Method::CtmigratePostcopy), "floor": gap(Method::Floor)},
                "postcopy_frozen_ms": med(mib, Method::CtmigratePostcopy, &|s| s.frozen_ms),
                "postcopy_all_pages_after_run_ms": all_pages,
                "postcopy_heartbeat_rate_while_arriving": (!rates.is_empty()).then(|| median(rates) as f64 / 100.0),
                "postcopy_gap_ratio_to_floor": ratio(gap(Method::CtmigratePostcopy), gap(Method::Floor)),
                "samples": samples.iter().filter(|((m, _), _)| *m == mib).map(|((_, name), v)| (name.to_string(), serde_json::to_value(v).unwrap())).collect::<serde_json::Map<_, _>>(),
            }),
        );
    }
    let (small, large) = (sizes[0], *sizes.last().unwrap());
    let pc = |mib| med(mib, Method::CtmigratePostcopy, &|s| s.heartbeat_gap_ms);
    results.insert(format!("postcopy_gap_{large}MiB_over_{small}MiB"), ratio(pc(large), pc(small)).into());
    let _ = Command::new("umount").arg("-l").arg(bed.dir.join("scratch")).status();
    println!("BENCH {}", serde_json::Value::Object(results));
}

/// TCP throughput between the hosts, in MB/s (10^6), for `bytes`.
fn raw_link_mbps(bed: &Testbed, bytes: u64) -> f64 {
    let addr: SocketAddr = format!("{}:{}", bed.hosts.dst_ip, port()).parse().unwrap();
    let listener = listen_in(&bed.hosts.dst, addr);
    tcp_throughput_mbps(listener, connect_from(&bed.hosts.src, addr).unwrap(), bytes)
}

/// Writes `bytes` on `conn` (connected to `listener`) as fast as a reader
/// on the other end takes them; MB/s (10^6).
fn tcp_throughput_mbps(listener: TcpListener, mut conn: TcpStream, bytes: u64) -> f64 {
    let reading = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                return got;
            }
            got += n as u64;
        }
    });
    let buf = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        conn.write_all(&buf).unwrap();
        sent += buf.len() as u64;
    }
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reading.join().unwrap(), sent);
    sent as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Milliseconds to touch each successive GiB of fresh anonymous memory,
/// `gib` GiB held at once: what a restore or an images tmpfs pays per GiB
/// on this machine. (Under a hypervisor that backs guest memory lazily,
/// the GiBs beyond what it has already backed cost several times more.)
fn fresh_memory_ms(gib: usize) -> Vec<u64> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    for _ in 0..gib {
        let started = Instant::now();
        let mut v: Vec<u8> = vec![0u8; 1 << 30];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        out.push(started.elapsed().as_millis() as u64);
        held.push(v);
    }
    out
}

fn ratio(a: u64, b: u64) -> f64 {
    (a as f64 / b.max(1) as f64 * 1000.0).round() / 1000.0
}

/// Frozen time (fixture heartbeat gap, median) against memory size, one
/// line per method.
fn plot(path: &Path, series: &[(String, Vec<(u64, u64)>)]) {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").expect("DejaVu Sans (install.sh installs fonts-dejavu-core)");
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    let max_y = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p.1)).max().unwrap_or(1) as f64 / 1000.0 * 1.1;
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let mut chart = ChartBuilder::on(&root)
        .caption("Frozen time as the workload saw it (median)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1100f64, 0f64..max_y)
        .unwrap();
    chart.configure_mesh().x_desc("container memory (MiB)").y_desc("frozen (s)").label_style(("sans-serif", 15)).draw().unwrap();
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let data: Vec<(f64, f64)> = pts.iter().map(|(x, y)| (*x as f64, *y as f64 / 1000.0)).collect();
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .unwrap()
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(data.into_iter().map(|p| Circle::new(p, 4, color.filled()))).unwrap();
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 15)).draw().unwrap();
    root.present().unwrap();
}

/// The whole harness. Sizes and repetitions can be narrowed with
/// CTMIGRATE_BENCH_SIZES (e.g. `64,512`) and CTMIGRATE_BENCH_RUNS.
/// `cargo test --release --test bench -- --ignored bench_migration --nocapture`
#[test]
#[ignore = "benchmark: run by hand, see docs/performance.md"]
fn bench_migration() {
    let bed = testbed("bm").expect("root prerequisites");
    let sizes: Vec<u64> = std::env::var("CTMIGRATE_BENCH_SIZES")
        .map(|s| s.split(',').map(|v| v.trim().parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![64, 512, 1024]);
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").map(|v| v.parse().unwrap()).unwrap_or(5);
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();

    // Every size: incompressible memory, dirtied slowly, all methods (and
    // at the variant size also ctmigrate without compression). The
    // variant size (the largest up to 512 MiB) also: dirtied fast, and
    // compressible.
    let all = [Method::Ctmigrate, Method::ByHand, Method::PageServer, Method::Floor];
    let variant_mib = *sizes.iter().filter(|&&m| m <= 512).max().unwrap_or(&sizes[0]);
    let mut cases: Vec<(Fixture, Vec<Method>)> = sizes
        .iter()
        .map(|&mib| {
            let mut methods = all.to_vec();
            if mib == variant_mib {
                methods.extend([Method::CtmigrateNoCompression, Method::CtmigrateInsecure]);
            }
            (Fixture { mib, dirty_kib_per_s: 256, compressible: false }, methods)
        })
        .collect();
    cases.push((Fixture { mib: variant_mib, dirty_kib_per_s: 16 * 1024, compressible: false }, vec![Method::Ctmigrate, Method::Floor]));
    cases.push((
        Fixture { mib: variant_mib, dirty_kib_per_s: 256, compressible: true },
        vec![Method::Ctmigrate, Method::CtmigrateNoCompression, Method::ByHand, Method::Floor],
    ));

    // CTMIGRATE_BENCH_METHODS=ctmigrate,floor narrows the methods (for
    // profiling one of them).
    if let Ok(only) = std::env::var("CTMIGRATE_BENCH_METHODS") {
        let only: Vec<&str> = only.split(',').collect();
        for (_, methods) in cases.iter_mut() {
            methods.retain(|m| only.contains(&m.name()));
        }
        cases.retain(|(_, m)| !m.is_empty());
    }
    let mut results = serde_json::Map::new();
    let mut table = Vec::new();
    let mut series: std::collections::BTreeMap<&str, Vec<(u64, u64)>> = Default::default();
    for (fixture, methods) in &cases {
        let mut samples: std::collections::BTreeMap<&str, Vec<Sample>> = Default::default();
        // Interleaved: run n of every method before run n+1 of any.
        for n in 0..runs {
            for &m in methods {
                let s = run_method(&bed, *fixture, m);
                eprintln!("{} {} run {n}: frozen {} ms, gap {} ms", fixture.name(), m.name(), s.frozen_ms, s.heartbeat_gap_ms);
                samples.entry(m.name()).or_default().push(s);
            }
        }
        let med = |name: &str, f: fn(&Sample) -> u64| samples.get(name).map(|v| median(v.iter().map(f).collect()));
        let floor = med("floor", |s| s.frozen_ms);
        let floor_gap = med("floor", |s| s.heartbeat_gap_ms);
        let mut entry = serde_json::Map::new();
        for (name, v) in &samples {
            let frozen = median(v.iter().map(|s| s.frozen_ms).collect());
            let gap = median(v.iter().map(|s| s.heartbeat_gap_ms).collect());
            let mut summary = serde_json::json!({
                "median_frozen_ms": frozen,
                "median_heartbeat_gap_ms": gap,
                "median_total_ms": median(v.iter().map(|s| s.total_ms).collect()),
                "median_wire_bytes": median(v.iter().map(|s| s.wire_bytes).collect()),
                "median_image_bytes": median(v.iter().map(|s| s.image_bytes).collect()),
                "samples": v,
            });
            if let (Some(f), Some(fg)) = (floor, floor_gap) {
                summary["frozen_ratio_to_floor"] = ratio(frozen, f).into();
                summary["gap_ratio_to_floor"] = ratio(gap, fg).into();
            }
            table.push(format!(
                "{:<34} {:<26} frozen {:>6} ms  gap {:>6} ms  wire {:>6} MB  floor x{}",
                fixture.name(),
                name,
                frozen,
                gap,
                median(v.iter().map(|s| s.wire_bytes).collect()) / 1_000_000,
                floor.map(|f| ratio(frozen, f).to_string()).unwrap_or_else(|| "-".into())
            ));
            if fixture.dirty_kib_per_s == 256 && !fixture.compressible && all.iter().any(|m| m.name() == *name) {
                series.entry(name).or_default().push((fixture.mib, gap));
            }
            entry.insert(name.to_string(), summary);
        }
        if let (Some(ours), Some(ps), Some(hand)) = (med("ctmigrate", |s| s.heartbeat_gap_ms), med("page-server", |s| s.heartbeat_gap_ms), med("by-hand", |s| s.heartbeat_gap_ms)) {
            entry.insert("ctmigrate_gap_ratio_to_page_server".into(), ratio(ours, ps).into());
            entry.insert("ctmigrate_gap_ratio_to_by_hand".into(), ratio(ours, hand).into());
        }
        results.insert(fixture.name(), entry.into());
    }

    // A link that is the bottleneck (tc's token bucket on the source
    // host's end): ctmigrate's transfer rate against the raw link's, both
    // through the same shaping. Skipped when CTMIGRATE_BENCH_METHODS does
    // not name `bottleneck`.
    let want_bottleneck = std::env::var("CTMIGRATE_BENCH_METHODS").map(|m| m.split(',').any(|x| x == "bottleneck")).unwrap_or(true);
    if want_bottleneck {
        let mbit: u64 = std::env::var("CTMIGRATE_BENCH_LINK_MBIT").map(|v| v.parse().unwrap()).unwrap_or(1000);
        let fixture = Fixture { mib: 256, dirty_kib_per_s: 256, compressible: false };
        let _shaped = ShapedLink::new(&bed, mbit);
        let mut raw = Vec::new();
        let mut ours = Vec::new();
        for n in 0..runs {
            raw.push((raw_link_mbps(&bed, fixture.mib << 20) * 10.0) as u64);
            let s = run_method(&bed, fixture, Method::Ctmigrate);
            let transfer_ms = s.frozen_phases.as_ref().and_then(|p| p["dump_and_transfer_ms"].as_u64()).expect("ctmigrate reports its phases");
            // Payload rate, as the raw link's: image bytes while CRIU dumps
            // and the stream carries them.
            ours.push(s.image_bytes * 10_000 / 1_000_000 / transfer_ms.max(1));
            eprintln!("bottleneck {mbit} Mbit/s run {n}: raw {} MB/s, ctmigrate {} MB/s", raw[n] as f64 / 10.0, ours[n] as f64 / 10.0);
        }
        let (raw_mbps, ours_mbps) = (median(raw) as f64 / 10.0, median(ours) as f64 / 10.0);
        let link_ratio = (ours_mbps / raw_mbps * 1000.0).round() / 1000.0;
        table.push(format!("bottleneck link {mbit} Mbit/s, {} MiB: raw {raw_mbps} MB/s, ctmigrate {ours_mbps} MB/s, ratio {link_ratio}", fixture.mib));
        // Where the link is slow, compression must pay on memory that
        // compresses (over the fast link it stays off: see the table).
        let compressible = Fixture { compressible: true, ..fixture };
        let mut frozen: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
        for n in 0..runs {
            for m in [Method::Ctmigrate, Method::CtmigrateNoCompression] {
                let s = run_method(&bed, compressible, m);
                eprintln!("bottleneck {mbit} Mbit/s {} {} run {n}: frozen {} ms, wire {} MB", compressible.name(), m.name(), s.frozen_ms, s.wire_bytes / 1_000_000);
                frozen.entry(m.name()).or_default().push(s.frozen_ms);
            }
        }
        let auto_ms = median(frozen.remove("ctmigrate").unwrap());
        let never_ms = median(frozen.remove("ctmigrate-compress-never").unwrap());
        table.push(format!(
            "bottleneck link {mbit} Mbit/s, {}: frozen {auto_ms} ms with auto compression, {never_ms} ms without (x{})",
            compressible.name(),
            ratio(auto_ms, never_ms)
        ));
        results.insert(
            "bottleneck_link".into(),
            serde_json::json!({
                "shaped_mbit": mbit, "fixture_mib": fixture.mib, "raw_MBps": raw_mbps, "ctmigrate_MBps": ours_mbps, "ratio_to_raw_link": link_ratio,
                "compressible_frozen_ms_auto": auto_ms, "compressible_frozen_ms_never": never_ms,
            }),
        );
    }

    let link: Vec<u64> = (0..runs).map(|_| (raw_link_mbps(&bed, 1 << 30) * 10.0) as u64).collect();
    let link_mbps = median(link) as f64 / 10.0;
    results.insert("raw_link_MBps".into(), link_mbps.into());
    table.push(format!("raw link (TCP, 1 GiB, median of {runs}): {link_mbps} MB/s"));

    let fresh = fresh_memory_ms(4);
    table.push(format!("fresh memory, ms per successive GiB held at once: {fresh:?}"));
    results.insert("fresh_memory_ms_per_gib".into(), serde_json::json!(fresh));

    let json_path = out_dir.join("migration-bench.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&serde_json::Value::Object(results.clone())).unwrap()).unwrap();
    let series: Vec<(String, Vec<(u64, u64)>)> = series.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let png = out_dir.join("frozen-time.png");
    plot(&png, &series);
    let _ = Command::new("umount").arg("-l").arg(bed.dir.join("scratch")).status();
    println!("{}", table.join("\n"));
    println!("written: {} and {}", json_path.display(), png.display());
    println!("BENCH {}", serde_json::Value::Object(results));
}

/// CPU time of the calling thread, in ms.
fn thread_cpu_ms() -> u64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD).unwrap();
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1000 + t.tv_usec() as u64 / 1000;
    ms(u.user_time()) + ms(u.system_time())
}

/// One pass of the image pipeline alone: `pages-1.img` in `src` sent by the
/// sender's streamer over loopback TCP (TLS unless `tls_dir` is None) into
/// the receiver's sink in `dst`, with the receiver's staging reserve as in
/// a migration. Returns (MB/s, sender CPU ms, receiver CPU ms).
fn pipeline_pass(src: &Path, dst: &Path, tls_dir: Option<&Path>, bytes: u64) -> (f64, u64, u64) {
    use migration_engine::images::{ImageSink, ImageStreamer};
    use migration_engine::tls::Conn;
    use migration_protocol::{CompressionMode, Compressor, FrameReader, FrameWriter, ImagesDone, MessageKind};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_cfg = tls_dir.map(|d| migration_engine::tls::server_config(d).unwrap());
    let dst = dst.to_path_buf();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let receiving = std::thread::spawn(move || {
        // Set aside before the sender connects, as a receiver does before
        // the source freezes: out of the throughput and the CPU figures.
        let reserve = migration_engine::scratch::Reserve::create(&dst, bytes).unwrap();
        ready_tx.send(()).unwrap();
        let (sock, _) = listener.accept().unwrap();
        // As the receiver and sender set their sockets.
        sock.set_nodelay(true).unwrap();
        let conn = match server_cfg {
            Some(cfg) => Conn::server(sock, cfg).unwrap(),
            None => Conn::plain(sock).unwrap(),
        };
        let cpu = thread_cpu_ms();
        let mut reader = FrameReader::new(conn);
        let mut sink = ImageSink::new(&dst, 100, 1 << 40).with_reserve(Some(reserve));
        loop {
            let f = reader.read_frame().unwrap();
            match f.kind {
                MessageKind::ImageData => {
                    sink.write_frame(&f).unwrap();
                    reader.recycle(f);
                }
                MessageKind::ImagesDone => {
                    sink.verify(&f.json::<ImagesDone>().unwrap()).unwrap();
                    return thread_cpu_ms() - cpu;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    ready.recv().unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_nodelay(true).unwrap();
    let conn = match tls_dir {
        Some(d) => Conn::client(sock, migration_engine::tls::client_config(d).unwrap(), "127.0.0.1").unwrap(),
        None => Conn::plain(sock).unwrap(),
    };
    let mut writer = FrameWriter::new(conn);
    let mut comp = Compressor::new(CompressionMode::Auto);
    let cpu = thread_cpu_ms();
    let started = Instant::now();
    let mut streamer = ImageStreamer::new(src);
    streamer.finish(&mut writer, &mut comp, 0).unwrap();
    writer.flush().unwrap();
    let sender_cpu = thread_cpu_ms() - cpu;
    let receiver_cpu = receiving.join().unwrap();
    let secs = started.elapsed().as_secs_f64();
    (bytes as f64 / secs / 1e6, sender_cpu, receiver_cpu)
}

/// The image pipeline against the raw link, same command, same sockets
/// (loopback TCP): how much of the link the pipeline uses, and its CPU cost
/// per GB on each side. CTMIGRATE_BENCH_PIPELINE_MIB sets the image size.
/// `cargo test --release --test bench -- --ignored bench_image_pipeline --nocapture`
#[test]
#[ignore = "benchmark: run by hand, see docs/performance.md"]
fn bench_image_pipeline() {
    let mib: u64 = std::env::var("CTMIGRATE_BENCH_PIPELINE_MIB").map(|v| v.parse().unwrap()).unwrap_or(512);
    let bytes = mib << 20;
    let base = tempfile::Builder::new().prefix("ctmigrate-pipeline").tempdir_in("/dev/shm").unwrap();
    let certs = base.path().join("certs");
    let tls_dir = migration_engine::tls::init_certs(&certs, &["127.0.0.1".to_string()]).unwrap().remove(0);
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").map(|v| v.parse().unwrap()).unwrap_or(5);
    let mut results: std::collections::BTreeMap<&str, Vec<(f64, u64, u64)>> = Default::default();
    for run in 0..runs {
        // Incompressible pages, as CRIU would have written them.
        let src = base.path().join(format!("src-{run}"));
        std::fs::create_dir(&src).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ run as u64;
        let mut chunk = vec![0u8; 1 << 20];
        let mut f = std::fs::File::create(src.join("pages-1.img")).unwrap();
        for _ in 0..mib {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&chunk).unwrap();
        }
        drop(f);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        results.entry("raw-link").or_default().push((tcp_throughput_mbps(listener, conn, bytes), 0, 0));
        for (name, tls) in [("pipeline-insecure", None), ("pipeline-tls", Some(tls_dir.as_path()))] {
            // The sender punches what it sent: a fresh copy each pass.
            let copy = base.path().join(format!("copy-{run}"));
            std::fs::create_dir(&copy).unwrap();
            std::fs::copy(src.join("pages-1.img"), copy.join("pages-1.img")).unwrap();
            let dst = base.path().join(format!("dst-{run}-{name}"));
            std::fs::create_dir(&dst).unwrap();
            let r = pipeline_pass(&copy, &dst, tls, bytes);
            eprintln!("run {run} {name}: {:.0} MB/s, sender {} ms CPU, receiver {} ms CPU", r.0, r.1, r.2);
            results.entry(name).or_default().push(r);
            std::fs::remove_dir_all(&copy).unwrap();
            std::fs::remove_dir_all(&dst).unwrap();
        }
        std::fs::remove_dir_all(&src).unwrap();
    }
    let med = |v: &[(f64, u64, u64)], f: fn(&(f64, u64, u64)) -> u64| median(v.iter().map(f).collect());
    let link = med(&results["raw-link"], |r| r.0 as u64);
    let gb = bytes as f64 / 1e9;
    let mut json = serde_json::Map::new();
    for (name, v) in &results {
        let mbps = med(v, |r| r.0 as u64);
        let (s, r) = (med(v, |r| r.1), med(v, |r| r.2));
        eprintln!(
            "{name:<18} {mbps:>5} MB/s  x{:.2} of the raw link  CPU per GB: sender {:.0} ms, receiver {:.0} ms",
            mbps as f64 / link as f64,
            s as f64 / gb,
            r as f64 / gb
        );
        json.insert(
            name.to_string(),
            serde_json::json!({"median_MBps": mbps, "ratio_to_raw_link": ratio(mbps, link), "sender_cpu_ms_per_GB": (s as f64 / gb).round(), "receiver_cpu_ms_per_GB": (r as f64 / gb).round()}),
        );
    }
    println!("PIPELINE {}", serde_json::Value::Object(json));
}
