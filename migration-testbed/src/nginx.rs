//! nginx (Debian's nginx-light: a root master, two `www-data` workers)
//! serving a 4 MiB file, and a keep-alive HTTP/1.1 client downloading it
//! again and again on one connection, each body's SHA-256 checked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::debian;
use super::services::{processes_in, pseudo_random, sha256_hex, write_file, Client, Proc, ServiceBed, ServiceSpec};
use super::wait_for;
use migration_engine::MigrationError;

pub const PORT: u16 = 80;
pub const BLOB_LEN: usize = 4 << 20;
/// Where the served file is, in the rootfs and in URLs.
pub const BLOB_PATH: &str = "srv/www/blob.bin";

pub const CONF: &str = r#"user www-data;
worker_processes 2;
daemon off;
pid /run/nginx.pid;
error_log /var/log/nginx/error.log;
events { worker_connections 256; }
http {
    access_log off;
    sendfile on;
    # One connection carries the whole run: nginx's default closes it
    # after 1000 requests.
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    server {
        listen 80;
        root /srv/www;
        location / { }
    }
}
"#;

pub fn spec() -> ServiceSpec {
    ServiceSpec { args: vec!["/usr/sbin/nginx".into(), "-c".into(), "/etc/nginx/ctm.conf".into()], user: None, cwd: "/" }
}

/// The file nginx serves and its SHA-256.
pub fn blob() -> (Vec<u8>, String) {
    let blob = pseudo_random(BLOB_LEN, 0x5eed_0016);
    let digest = sha256_hex(&blob);
    (blob, digest)
}

/// Adds the configuration and the served file to the rootfs.
pub fn prepare(rootfs: &Path, blob: &[u8]) -> Result<(), MigrationError> {
    write_file(&rootfs.join("etc/nginx/ctm.conf"), CONF.as_bytes(), 0o644, None)?;
    write_file(&rootfs.join(BLOB_PATH), blob, 0o644, None)
}

/// One HTTP/1.1 GET on a keep-alive connection: the body, checked to be
/// complete and the connection to stay open.
pub fn http_get(r: &mut BufReader<TcpStream>, w: &mut TcpStream, path: &str) -> Result<Vec<u8>, MigrationError> {
    let fail = |m: String| Err(MigrationError::Other(m));
    write!(w, "GET {path} HTTP/1.1\r\nHost: ctmigrate\r\nConnection: keep-alive\r\n\r\n").map_err(MigrationError::io("sending"))?;
    let mut status = String::new();
    match r.read_line(&mut status) {
        Ok(0) => return fail("the server closed the connection".into()),
        Ok(_) => {}
        Err(e) => return Err(MigrationError::io("reading the status line")(e)),
    }
    if !status.starts_with("HTTP/1.1 200 ") {
        return fail(format!("status {:?}", status.trim()));
    }
    let mut length = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(MigrationError::io("reading headers"))?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else { return fail(format!("bad header {h:?}")) };
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse::<usize>().ok(),
            "connection" if value.trim().eq_ignore_ascii_case("close") => return fail("the server is closing the connection".into()),
            _ => {}
        }
    }
    let Some(length) = length else { return fail("no Content-Length".into()) };
    let mut body = vec![0; length];
    r.read_exact(&mut body).map_err(MigrationError::io(format!("reading {length} body bytes")))?;
    Ok(body)
}

/// The master runs as root, its two workers as `www_uid`.
pub fn workers_ok(procs: &[Proc], master: i32, www_uid: u32) -> bool {
    let (masters, workers): (Vec<&Proc>, Vec<&Proc>) = procs.iter().partition(|p| p.pid == master);
    masters.len() == 1
        && masters[0].uid == 0
        && workers.len() == 2
        && procs.iter().all(|p| p.name == "nginx")
        && workers.iter().all(|p| p.uid == www_uid)
}

/// One connection to the bed's nginx, once it answers, and its processes
/// as they should be (master as root, two www-data workers); returns
/// www-data's uid.
pub fn connect(sb: &mut ServiceBed, src_pidns: u64) -> Result<(TcpStream, u32), MigrationError> {
    let t = Instant::now();
    let stream = sb.connect(PORT, Duration::from_secs(30))?;
    sb.timings.push(("nginx start", t.elapsed()));
    let (www_uid, _) = debian::user_ids(&sb.rootfs(), "www-data")?;
    let src_pid = sb.source_pid()?;
    let procs = wait_for(Duration::from_secs(10), || Some(processes_in(src_pidns)).filter(|p| workers_ok(p, src_pid, www_uid)));
    if procs.is_none() {
        return Err(MigrationError::Other(format!(
            "expected an nginx master as root and two www-data workers: {:?}",
            processes_in(src_pidns)
        )));
    }
    Ok((stream, www_uid))
}

/// The client: GET /blob.bin again and again on the keep-alive
/// connection, each body's length and SHA-256 checked.
pub fn client(stream: &TcpStream, digest: &str) -> Result<Client<()>, MigrationError> {
    let clone = || stream.try_clone().map_err(MigrationError::io("cloning the HTTP connection"));
    let (mut r, mut w) = (BufReader::with_capacity(1 << 16, clone()?), clone()?);
    let digest = digest.to_string();
    let url = format!("/{}", BLOB_PATH.trim_start_matches("srv/www/"));
    Client::spawn("http", stream, (), move |_, _| {
        let body = http_get(&mut r, &mut w, &url)?;
        if body.len() != BLOB_LEN || sha256_hex(&body) != digest {
            return Err(MigrationError::Other(format!(
                "body of {} bytes with digest {}, expected {BLOB_LEN} bytes with {digest}",
                body.len(),
                sha256_hex(&body)
            )));
        }
        Ok(())
    })
}
