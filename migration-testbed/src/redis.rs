//! Redis (Debian's redis-server, as user redis) with a million keys, and a
//! RESP2 client doing SET/GET on one connection with every value checked.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::services::{Client, ServiceBed, ServiceSpec};
use super::wait_for;
use migration_engine::MigrationError;

pub const PORT: u16 = 6379;
/// Keys `DEBUG POPULATE` makes (`key:N` = `value:N`).
pub const POPULATED: u64 = 1_000_000;

/// redis-server in the foreground, no persistence, `DEBUG` allowed (for
/// `DEBUG POPULATE`).
pub fn spec() -> ServiceSpec {
    let args = [
        "/usr/bin/redis-server",
        "--bind",
        "0.0.0.0",
        "--port",
        "6379",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--enable-debug-command",
        "yes",
        "--dir",
        "/var/lib/redis",
        "--logfile",
        "/var/log/redis/redis-server.log",
    ];
    ServiceSpec { args: args.map(String::from).to_vec(), user: Some("redis"), cwd: "/var/lib/redis" }
}

#[derive(Debug, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

fn fail<T>(m: impl Into<String>) -> Result<T, MigrationError> {
    Err(MigrationError::Other(m.into()))
}

/// A RESP2 client on one connection.
pub struct Resp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Resp {
    pub fn new(stream: &TcpStream) -> Result<Self, MigrationError> {
        let clone = || stream.try_clone().map_err(MigrationError::io("cloning the Redis connection"));
        Ok(Resp { r: BufReader::with_capacity(1 << 16, clone()?), w: clone()? })
    }

    pub fn send(&mut self, args: &[&[u8]]) -> Result<(), MigrationError> {
        let mut buf = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&buf).map_err(MigrationError::io("sending"))
    }

    fn line(&mut self) -> Result<String, MigrationError> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => fail("connection closed"),
            Ok(_) if l.ends_with("\r\n") => Ok(l.trim_end_matches("\r\n").to_string()),
            Ok(_) => fail(format!("truncated line {l:?}")),
            Err(e) => Err(MigrationError::io("reading")(e)),
        }
    }

    pub fn reply(&mut self) -> Result<Reply, MigrationError> {
        let l = self.line()?;
        let (kind, rest) = l.split_at(1.min(l.len()));
        let num = || rest.parse::<i64>().map_err(|_| MigrationError::Other(format!("bad reply {l:?}")));
        Ok(match kind {
            "+" => Reply::Simple(rest.into()),
            "-" => Reply::Error(rest.into()),
            ":" => Reply::Int(num()?),
            "$" => {
                let n = num()?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut v = vec![0; n as usize + 2];
                    self.r.read_exact(&mut v).map_err(MigrationError::io("reading a bulk string"))?;
                    if !v.ends_with(b"\r\n") {
                        return fail("a bulk string without its CRLF");
                    }
                    v.truncate(n as usize);
                    Reply::Bulk(Some(v))
                }
            }
            "*" => {
                let n = num()?;
                if n < 0 {
                    Reply::Array(None)
                } else {
                    Reply::Array(Some((0..n).map(|_| self.reply()).collect::<Result<_, _>>()?))
                }
            }
            _ => return fail(format!("bad reply {l:?}")),
        })
    }

    pub fn cmd(&mut self, args: &[&[u8]]) -> Result<Reply, MigrationError> {
        self.send(args)?;
        self.reply()
    }

    /// Sends a command and fails unless it answers `want`.
    pub fn expect(&mut self, args: &[&[u8]], want: Reply) -> Result<(), MigrationError> {
        let got = self.cmd(args)?;
        if got != want {
            let shown: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            return fail(format!("{shown:?} answered {got:?}, expected {want:?}"));
        }
        Ok(())
    }

    /// `INFO server`'s run_id: random per redis-server start.
    pub fn run_id(&mut self) -> Result<String, MigrationError> {
        match self.cmd(&[b"INFO", b"server"])? {
            Reply::Bulk(Some(text)) => String::from_utf8_lossy(&text)
                .lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map(|s| s.trim().to_string())
                .ok_or_else(|| MigrationError::Other("INFO without run_id".into())),
            other => fail(format!("INFO answered {other:?}")),
        }
    }
}

/// The value the client stores under `ctm:<n>`: different lengths, and
/// distinct per run.
pub fn value(token: &str, n: u64) -> Vec<u8> {
    let mut v = format!("{token}:{n}:").into_bytes();
    v.extend(std::iter::repeat_n(b'a' + (n % 26) as u8, (n % 200) as usize));
    v
}

/// One connection to the bed's Redis, once it answers PING.
pub fn connect(sb: &mut ServiceBed) -> Result<(TcpStream, Resp), MigrationError> {
    let t = Instant::now();
    let stream = sb.connect(PORT, Duration::from_secs(30))?;
    let mut conn = Resp::new(&stream)?;
    wait_for(Duration::from_secs(30), || conn.cmd(&[b"PING"]).ok().filter(|r| *r == Reply::Simple("PONG".into())))
        .ok_or_else(|| MigrationError::Other("redis never answered PING".into()))?;
    sb.timings.push(("Redis start", t.elapsed()));
    Ok((stream, conn))
}

/// `DEBUG POPULATE` [`POPULATED`] keys, checked with DBSIZE.
pub fn populate(sb: &mut ServiceBed, conn: &mut Resp) -> Result<(), MigrationError> {
    let t = Instant::now();
    conn.expect(&[b"DEBUG", b"POPULATE", POPULATED.to_string().as_bytes()], Reply::Simple("OK".into()))?;
    conn.expect(&[b"DBSIZE"], Reply::Int(POPULATED as i64))?;
    sb.timings.push(("DEBUG POPULATE 1000000", t.elapsed()));
    Ok(())
}

/// The client: SET ctm:n, GET it back, GET one of the populated keys;
/// every answer checked.
pub fn client(stream: &TcpStream, conn: Resp, token: &str) -> Result<Client<Resp>, MigrationError> {
    let token = token.to_string();
    Client::spawn("redis", stream, conn, move |c: &mut Resp, n| {
        let key = format!("ctm:{n}");
        let v = value(&token, n);
        c.expect(&[b"SET", key.as_bytes(), &v], Reply::Simple("OK".into()))?;
        c.expect(&[b"GET", key.as_bytes()], Reply::Bulk(Some(v)))?;
        let k = (n * 7919) % POPULATED;
        c.expect(&[b"GET", format!("key:{k}").as_bytes()], Reply::Bulk(Some(format!("value:{k}").into_bytes())))
    })
}

/// After a client made `steps` rounds: the key count is exact, and every
/// key holds its value, the client's and the populated ones (MGET, a few
/// thousand at a time).
pub fn check_every_value(conn: &mut Resp, token: &str, steps: u64) -> Result<(), MigrationError> {
    conn.expect(&[b"DBSIZE"], Reply::Int((POPULATED + steps) as i64))?;
    let check = |conn: &mut Resp, keys: Vec<String>, values: Vec<Vec<u8>>| -> Result<(), MigrationError> {
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        let want = Reply::Array(Some(values.into_iter().map(|v| Reply::Bulk(Some(v))).collect()));
        if conn.cmd(&args)? != want {
            return fail(format!("MGET {}..{}: values differ", keys[0], keys[keys.len() - 1]));
        }
        Ok(())
    };
    for start in (0..steps).step_by(1000) {
        let range = start..(start + 1000).min(steps);
        check(conn, range.clone().map(|n| format!("ctm:{n}")).collect(), range.map(|n| value(token, n)).collect())?;
    }
    for start in (0..POPULATED).step_by(5000) {
        let range = start..(start + 5000).min(POPULATED);
        check(conn, range.clone().map(|n| format!("key:{n}")).collect(), range.map(|n| format!("value:{n}").into_bytes()).collect())?;
    }
    Ok(())
}
