//! Root tests of recording and rebuilding a namespace (skipped, with a
//! note, when not root). Each works inside named namespaces it makes and
//! removes: one standing for the host, with a bridge, and the one the
//! receiver builds for the container.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use container_network::{DestinationNetwork, InterfaceRecord, Netns, NetworkRecord, RouteRecord};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Where `ip` is, found without PATH (a test empties it).
fn ip_binary() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].into_iter().find(|p| std::path::Path::new(p).exists()).expect("iproute2 is not installed")
}

/// A named namespace standing for a host, with bridge `br0` up; removed on
/// drop. Made with `ip` (test machinery), so that the library's own code is
/// not what sets up the bed it is measured on.
struct HostNs {
    name: String,
}

impl HostNs {
    fn new(tag: &str) -> Self {
        let name = format!("ctmnl-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| assert!(Command::new(ip_binary()).args(args).status().unwrap().success(), "ip {args:?}");
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &name, "link", "set", "br0", "up"]);
        HostNs { name }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` in a thread inside this namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for HostNs {
    fn drop(&mut self) {
        let _ = Command::new(ip_binary()).args(["netns", "del", &self.name]).status();
    }
}

/// Two interfaces, IPv4 and IPv6 addresses, default and other routes.
fn sample_record() -> NetworkRecord {
    NetworkRecord {
        interfaces: vec![
            InterfaceRecord {
                name: "eth0".into(),
                mac: "02:42:0a:00:00:05".into(),
                mtu: 1500,
                addresses: vec!["10.0.0.5/24".into(), "10.0.9.5/16".into(), "fd00::5/64".into()],
            },
            InterfaceRecord { name: "eth1".into(), mac: "02:42:0a:01:00:05".into(), mtu: 1400, addresses: vec!["192.168.7.2/24".into()] },
        ],
        routes: vec![
            RouteRecord { destination: "default".into(), gateway: Some("10.0.0.1".into()), device: "eth0".into(), family: 4 },
            RouteRecord { destination: "10.99.0.7/32".into(), gateway: Some("192.168.7.1".into()), device: "eth1".into(), family: 4 },
            RouteRecord { destination: "fd01::/64".into(), gateway: Some("fd00::1".into()), device: "eth0".into(), family: 6 },
            RouteRecord { destination: "default".into(), gateway: Some("fd00::1".into()), device: "eth0".into(), family: 6 },
        ],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A namespace built from a record is recorded back as the same record,
/// and neither needs an `ip` process: PATH names only an empty directory
/// while they run. (The record also has a route without a gateway, which
/// `ip route add ... onlink` could not rebuild.)
#[test]
fn a_built_namespace_records_as_its_record() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let host = HostNs::new("rt");
    let id = format!("nlrt{}", std::process::id());
    let empty = std::env::temp_dir().join(format!("ctmnl-no-ip-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let path = std::env::var_os("PATH");
    // The bench, the only other test here, finds `ip` without PATH.
    std::env::set_var("PATH", &empty);
    let outcome = host.run(move || {
        let mut record = sample_record();
        // (Where the kernel lists it: the record keeps the kernel's order.)
        record.routes.insert(2, RouteRecord { destination: "172.16.0.0/12".into(), gateway: None, device: "eth1".into(), family: 4 });
        let built = DestinationNetwork::build(&record, &id, Some("br0")).map_err(|e| e.to_string());
        let recorded = built.as_ref().map_err(Clone::clone).and_then(|_| {
            container_network::record::record(&Netns::Named(DestinationNetwork::netns_name(&id))).map_err(|e| e.to_string())
        });
        let removed = DestinationNetwork::remove_for(&id).map_err(|e| e.to_string());
        (record, built.map(|_| ()), recorded, removed)
    });
    if let Some(p) = path {
        std::env::set_var("PATH", p);
    }
    let _ = std::fs::remove_dir(&empty);
    let (record, built, recorded, removed) = outcome;
    built.unwrap();
    removed.unwrap();
    assert_eq!(recorded.unwrap(), record);
}

/// How long the receiver's network steps take: building the namespace
/// (before the freeze), bringing it up (in the frozen window, within
/// the commit) and reading it back (the sender's record, in preflight).
/// `CTMIGRATE_BENCH_RUNS` runs (default 10).
#[test]
#[ignore = "benchmark: run by hand, see docs/performance.md"]
fn bench_destination_network() {
    assert!(is_root(), "the benchmark needs root");
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let host = HostNs::new("bench");
    let samples = host.run(move || {
        let record = sample_record();
        let mut samples = Vec::new();
        for run in 0..runs {
            let id = format!("nlb{}r{run}", std::process::id());
            let t = Instant::now();
            let built = DestinationNetwork::build(&record, &id, Some("br0")).unwrap();
            let build = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            built.activate().unwrap();
            let activate = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let recorded = container_network::record::record(&built.netns).unwrap();
            let read = t.elapsed().as_secs_f64() * 1e3;
            assert_eq!(recorded, record);
            let t = Instant::now();
            DestinationNetwork::remove_for(&id).unwrap();
            let remove = t.elapsed().as_secs_f64() * 1e3;
            samples.push((build, activate, read, remove));
        }
        samples
    });
    for (run, s) in samples.iter().enumerate() {
        println!("run {run}: build {:.2} ms, activate {:.2} ms, record {:.2} ms, remove {:.2} ms", s.0, s.1, s.2, s.3);
    }
    let m = |f: fn(&(f64, f64, f64, f64)) -> f64| median(samples.iter().map(f).collect());
    let (build, activate, read, remove) = (m(|s| s.0), m(|s| s.1), m(|s| s.2), m(|s| s.3));
    println!("median of {runs}: build {build:.2} ms, activate {activate:.2} ms, record {read:.2} ms, remove {remove:.2} ms");
    println!(
        "BENCH {{\"bench\":\"destination_network\",\"runs\":{runs},\"build_ms\":{build:.3},\"activate_ms\":{activate:.3},\"record_ms\":{read:.3},\"remove_ms\":{remove:.3}}}"
    );
}

/// Bringing a restored namespace up forgets the neighbour entries its
/// sockets made while its links were down (a failed resolution retries
/// only every second, and holds every packet to that peer meanwhile);
/// permanent entries stay.
#[test]
fn activation_forgets_what_the_namespace_learnt_while_down() {
    if !is_root() {
        assert_ne!(std::env::var("CTMIGRATE_REQUIRE_ROOT_TESTS").as_deref(), Ok("1"), "root test cannot run: not root");
        eprintln!("skipped: needs root");
        return;
    }
    let host = HostNs::new("nb");
    let id = format!("nlnb{}", std::process::id());
    let ns = DestinationNetwork::netns_name(&id);
    let neighbours = move |ns: &str| {
        let out = Command::new(ip_binary()).args(["-n", ns, "neigh", "show", "dev", "eth0"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let outcome = host.run({
        let ns = ns.clone();
        move || {
            let network = DestinationNetwork::build(&sample_record(), &id, Some("br0")).map_err(|e| e.to_string())?;
            let ip = |args: &[&str]| Command::new(ip_binary()).args(["-n", &ns]).args(args).status().unwrap().success();
            // One entry as a failed resolution leaves it, one permanent.
            assert!(ip(&["neigh", "add", "10.0.0.9", "dev", "eth0", "nud", "failed"]) || ip(&["neigh", "add", "10.0.0.9", "lladdr", "02:00:00:00:00:09", "dev", "eth0", "nud", "stale"]));
            assert!(ip(&["neigh", "add", "10.0.0.8", "lladdr", "02:00:00:00:00:08", "dev", "eth0", "nud", "permanent"]));
            let before = neighbours(&ns);
            let activated = network.activate().map_err(|e| e.to_string());
            let after = neighbours(&ns);
            let removed = DestinationNetwork::remove_for(&id).map_err(|e| e.to_string());
            Ok::<_, String>((before, activated, after, removed))
        }
    });
    let (before, activated, after, removed) = outcome.unwrap();
    activated.unwrap();
    removed.unwrap();
    assert!(before.contains("10.0.0.9") && before.contains("10.0.0.8"), "the entries were not made: {before}");
    assert!(!after.contains("10.0.0.9"), "the learnt entry stayed: {after}");
    assert!(after.contains("10.0.0.8 ") && after.contains("PERMANENT"), "the permanent entry went: {after}");
}
