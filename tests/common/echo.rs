//! A TCP client of the echo fixture, for the tests whose containers keep
//! a live connection across a migration.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migration_testbed::{build_bundle, connect_from, join_network_namespace, ContainerNetwork, FixtureContainer, Testbed, Workload};

pub const ECHO_PORT: u16 = 7070;

/// One TCP connection to the echo server in the container. The writer
/// sends consecutive 64-bit numbers; the reader checks that each echoed
/// number is the next one, so a lost, duplicated or reordered byte fails.
pub struct EchoClient {
    stream: TcpStream,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    reader: Option<JoinHandle<Result<(), String>>>,
    /// The longest time between two echoed numbers, in microseconds.
    max_gap_us: Arc<AtomicU64>,
}

impl EchoClient {
    pub fn connect(net: &ContainerNetwork) -> Self {
        let addr = SocketAddr::from((net.container_ip, ECHO_PORT));
        let stream = super::wait_for(Duration::from_secs(10), || connect_from(&net.client, addr).ok())
            .unwrap_or_else(|| panic!("the echo server at {addr} never answered"));
        Self::adopt(stream)
    }

    /// A request/response client instead of a stream: one number, then
    /// its echo, then 10 ms of quiet (as an RPC or database client talks).
    pub fn connect_request_response(net: &ContainerNetwork) -> Self {
        let addr = SocketAddr::from((net.container_ip, ECHO_PORT));
        let stream = super::wait_for(Duration::from_secs(10), || connect_from(&net.client, addr).ok())
            .unwrap_or_else(|| panic!("the echo server at {addr} never answered"));
        Self::start(stream, 1, Duration::from_millis(10), true)
    }

    pub fn adopt(stream: TcpStream) -> Self {
        Self::start(stream, 64, Duration::from_millis(2), false)
    }

    /// Writes `batch` numbers every `pause`; with `wait_for_echo`, only
    /// once the last batch came back.
    pub fn start(stream: TcpStream, batch: u64, pause: Duration, wait_for_echo: bool) -> Self {
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, echoed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let writer = {
            let (mut s, stop, sent, echoed) = (stream.try_clone().unwrap(), stop.clone(), sent.clone(), echoed.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut next = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let numbers: Vec<u8> = (next..next + batch).flat_map(|n| n.to_be_bytes()).collect();
                    s.write_all(&numbers)?;
                    next += batch;
                    sent.store(next, Ordering::Relaxed);
                    while wait_for_echo && echoed.load(Ordering::Relaxed) < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    std::thread::sleep(pause);
                }
                Ok(())
            })
        };
        let max_gap_us = Arc::new(AtomicU64::new(0));
        let reader = {
            let (mut s, echoed, max_gap_us) = (stream.try_clone().unwrap(), echoed.clone(), max_gap_us.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut expected = 0u64;
                let mut buf = [0u8; 8];
                let mut last = Instant::now();
                loop {
                    match s.read_exact(&mut buf) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) => return Err(format!("reading echo number {expected}: {e}")),
                    }
                    max_gap_us.fetch_max(last.elapsed().as_micros() as u64, Ordering::Relaxed);
                    last = Instant::now();
                    let got = u64::from_be_bytes(buf);
                    if got != expected {
                        return Err(format!("echo number {expected} came back as {got}: data lost or duplicated"));
                    }
                    expected += 1;
                    echoed.store(expected, Ordering::Relaxed);
                }
            })
        };
        EchoClient { stream, stop, sent, echoed, writer: Some(writer), reader: Some(reader), max_gap_us }
    }

    /// The longest time between two echoed numbers since the last call.
    pub fn take_longest_gap(&self) -> Duration {
        Duration::from_micros(self.max_gap_us.swap(0, Ordering::Relaxed))
    }

    /// Waits until `more` numbers beyond what is echoed now come back.
    pub fn assert_flowing(&self, more: u64, within: Duration, context: &str) {
        let target = self.echoed.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + within;
        while self.echoed.load(Ordering::Relaxed) < target {
            assert!(
                !self.reader.as_ref().unwrap().is_finished(),
                "{context}: the connection's reader ended (after {} numbers)",
                self.echoed.load(Ordering::Relaxed)
            );
            assert!(Instant::now() < deadline, "{context}: the connection stalled at {} numbers", self.echoed.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops sending, waits for every number sent to come back in order.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.take().unwrap().join().unwrap().expect("writing to the connection");
        let sent = self.sent.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.echoed.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.reader.take().unwrap().join().unwrap().expect("every echoed number in order");
        assert_eq!(self.echoed.load(Ordering::Relaxed), sent, "numbers sent but never echoed");
        sent
    }
}

/// An echo container whose namespace is the network's named source
/// namespace.
pub fn start_echo(bed: &Testbed, net: &ContainerNetwork, id: &str) -> FixtureContainer {
    let bundle = bed.dir.join("src-bundles").join(id);
    std::fs::create_dir_all(&bundle).unwrap();
    build_bundle(&bed.runc_binary, &bundle, &Workload::Echo { port: ECHO_PORT }).unwrap();
    join_network_namespace(&bundle, &net.container_netns_path()).unwrap();
    FixtureContainer::start(bed.src_runc.clone(), id, &bundle).expect("starting the echo container")
}

