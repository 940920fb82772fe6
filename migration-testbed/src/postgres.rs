//! PostgreSQL 15 (Debian's, as user postgres) under pgbench from the same
//! rootfs: several clients, each on its own connection for the whole run;
//! afterwards no transaction failed or aborted and every committed one is
//! a row of pgbench_history.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::services::{write_file, KillOnDrop, ServiceBed, ServiceSpec};
use super::wait_for;
use migration_engine::MigrationError;

pub const PORT: u16 = 5432;
pub const BIN: &str = "/usr/lib/postgresql/15/bin";
pub const PGBENCH_CLIENTS: u32 = 4;
pub const PGBENCH_TX_PER_CLIENT: u64 = 3750;
/// Transactions per second over all clients (`pgbench -R`): the run takes
/// about 15 000 / 300 = 50 s. The migration starts 3 s in and (moving the
/// 540 MB rootfs too) takes 10-20 s here, so it falls in the middle.
pub const PGBENCH_RATE: u32 = 300;

/// Runs as the container's init, as user postgres: a data directory of its
/// own (initdb on first start), then PostgreSQL in the foreground.
pub const START_SCRIPT: &str = r#"#!/bin/sh
set -e
D=/var/lib/postgresql/ctm
if [ ! -s "$D/PG_VERSION" ]; then
    /usr/lib/postgresql/15/bin/initdb -D "$D" -U postgres -A trust >/var/lib/postgresql/initdb.log 2>&1
fi
exec /usr/lib/postgresql/15/bin/postgres -D "$D" \
    -c listen_addresses='*' -c unix_socket_directories=/tmp \
    -c hba_file=/etc/ctm/pg_hba.conf 2>>/var/lib/postgresql/postgres.log
"#;

pub const HBA: &str = "local all all trust\nhost all all 0.0.0.0/0 trust\n";

pub fn spec() -> ServiceSpec {
    ServiceSpec { args: vec!["/bin/sh".into(), "/ctm/start-postgres.sh".into()], user: Some("postgres"), cwd: "/var/lib/postgresql" }
}

/// Adds the start script and pg_hba.conf to the rootfs.
pub fn prepare(rootfs: &Path) -> Result<(), MigrationError> {
    write_file(&rootfs.join("ctm/start-postgres.sh"), START_SCRIPT.as_bytes(), 0o755, None)?;
    write_file(&rootfs.join("etc/ctm/pg_hba.conf"), HBA.as_bytes(), 0o644, None)
}

/// psql in the client namespace: the rows of `sql`'s answer.
pub fn psql(sb: &mut ServiceBed, sql: &str) -> Result<String, MigrationError> {
    let ip = sb.net.container_ip.to_string();
    let out = sb
        .client_command(&format!("{BIN}/psql"))?
        .args(["-h", &ip, "-p", &PORT.to_string(), "-U", "postgres", "-d", "postgres", "-tAX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .map_err(MigrationError::io("running psql"))?;
    if !out.status.success() {
        return Err(MigrationError::Other(format!("psql: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// initdb's and PostgreSQL's logs in `rootfs`.
pub fn logs(rootfs: &Path) -> String {
    let log = std::fs::read_to_string(rootfs.join("var/lib/postgresql/postgres.log")).unwrap_or_default();
    let init = std::fs::read_to_string(rootfs.join("var/lib/postgresql/initdb.log")).unwrap_or_default();
    format!("initdb.log:\n{init}\npostgres.log:\n{log}")
}

/// Waits (90 s at most: initdb runs first) until PostgreSQL answers.
pub fn wait_ready(sb: &mut ServiceBed) -> Result<(), MigrationError> {
    let t = Instant::now();
    if wait_for(Duration::from_secs(90), || psql(sb, "SELECT 1").ok().filter(|r| r == "1")).is_none() {
        return Err(MigrationError::Other(format!(
            "PostgreSQL did not answer within 90 s: {}\n{}",
            sb.service_log_hint(),
            logs(&sb.rootfs())
        )));
    }
    sb.timings.push(("PostgreSQL start (initdb included)", t.elapsed()));
    Ok(())
}

/// pgbench's tables at scale 10 (a million accounts), history empty.
pub fn init_pgbench(sb: &mut ServiceBed) -> Result<(), MigrationError> {
    let ip = sb.net.container_ip.to_string();
    let t = Instant::now();
    let init = sb
        .client_command(&format!("{BIN}/pgbench"))?
        .args(["-h", &ip, "-p", &PORT.to_string(), "-U", "postgres", "-i", "-s", "10", "postgres"])
        .stdin(Stdio::null())
        .output()
        .map_err(MigrationError::io("running pgbench -i"))?;
    if !init.status.success() {
        return Err(MigrationError::Other(format!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr).trim())));
    }
    sb.timings.push(("pgbench -i -s 10", t.elapsed()));
    let rows = psql(sb, "SELECT count(*) FROM pgbench_history")?;
    if rows != "0" {
        return Err(MigrationError::Other(format!("pgbench_history holds {rows} rows before the run")));
    }
    Ok(())
}

fn pgbench_line<'a>(output: &'a str, prefix: &str) -> Option<&'a str> {
    output.lines().find_map(|l| l.trim().strip_prefix(prefix)).map(str::trim)
}

/// A pgbench run from the client namespace: [`PGBENCH_CLIENTS`] clients,
/// [`PGBENCH_TX_PER_CLIENT`] transactions each, at [`PGBENCH_RATE`] in
/// all so that it is still running when a migration completes. Killed if
/// dropped before it ends.
pub struct Pgbench {
    child: KillOnDrop,
    out: PathBuf,
    err: PathBuf,
    pub started: Instant,
    /// Where `-l` writes its per-transaction logs (host path), if asked.
    pub log_dir: Option<PathBuf>,
}

/// How a pgbench run ended.
pub struct PgbenchOutcome {
    pub stdout: String,
    pub stderr: String,
    pub status: std::process::ExitStatus,
}

impl Pgbench {
    /// `log`: also write a per-transaction log (for the clients' longest
    /// gap), in the client root's tmpfs.
    pub fn start(sb: &mut ServiceBed, log: bool) -> Result<Self, MigrationError> {
        let ip = sb.net.container_ip.to_string();
        let out = sb.bed.dir.join("pgbench.out");
        let err = sb.bed.dir.join("pgbench.err");
        let root = sb.client_root()?;
        let mut cmd = sb.client_command(&format!("{BIN}/pgbench"))?;
        cmd.args(["-h", &ip, "-p", &PORT.to_string(), "-U", "postgres"])
            .args(["-c", &PGBENCH_CLIENTS.to_string(), "-j", "2", "-t", &PGBENCH_TX_PER_CLIENT.to_string()])
            .args(["-R", &PGBENCH_RATE.to_string(), "-P", "1"]);
        if log {
            cmd.args(["-l", "--log-prefix=/tmp/pgbench_log"]);
        }
        let create = |p: &Path| std::fs::File::create(p).map_err(MigrationError::io(format!("creating {}", p.display())));
        let child = cmd
            .arg("postgres")
            .stdin(Stdio::null())
            .stdout(create(&out)?)
            .stderr(create(&err)?)
            .spawn()
            .map_err(MigrationError::io("starting pgbench"))?;
        Ok(Pgbench { child: KillOnDrop(child), out, err, started: Instant::now(), log_dir: log.then(|| root.join("tmp")) })
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Waits for `seconds` progress reports.
    pub fn wait_progress(&mut self, seconds: usize) -> Result<(), MigrationError> {
        let progress = |p: &Self| p.stderr().lines().filter(|l| l.starts_with("progress:")).count();
        let ok = wait_for(Duration::from_secs(60), || (progress(self) >= seconds).then_some(()));
        if ok.is_none() || !self.running() {
            return Err(MigrationError::Other(format!("pgbench did not get going: {}", self.stderr())));
        }
        Ok(())
    }

    pub fn wait(mut self, within: Duration) -> Result<PgbenchOutcome, MigrationError> {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = self.child.0.try_wait().map_err(MigrationError::io("waiting for pgbench"))? {
                break st;
            }
            if Instant::now() >= deadline {
                return Err(MigrationError::Other(format!("pgbench did not finish within {within:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stdout = std::fs::read_to_string(&self.out).map_err(MigrationError::io("reading pgbench's output"))?;
        Ok(PgbenchOutcome { stdout, stderr: self.stderr(), status })
    }

    /// The longest time between two transactions' completions, from the
    /// `-l` logs (`client transaction latency script epoch_s epoch_us
    /// [lag]`, one file per thread).
    pub fn longest_gap(log_dir: &Path) -> Result<Duration, MigrationError> {
        let mut done: Vec<u64> = Vec::new();
        for e in std::fs::read_dir(log_dir).map_err(MigrationError::io(format!("reading {}", log_dir.display())))?.flatten() {
            if !e.file_name().to_string_lossy().starts_with("pgbench_log") {
                continue;
            }
            let text = std::fs::read_to_string(e.path()).map_err(MigrationError::io(format!("reading {}", e.path().display())))?;
            for l in text.lines() {
                let f: Vec<u64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                if f.len() >= 6 {
                    done.push(f[4] * 1_000_000 + f[5]);
                }
            }
        }
        done.sort_unstable();
        Ok(Duration::from_micros(done.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)))
    }
}

impl PgbenchOutcome {
    /// Every transaction committed: exit 0, none failed or aborted, all
    /// processed. Returns how many.
    pub fn all_committed(&self) -> Result<u64, MigrationError> {
        let (stdout, stderr) = (&self.stdout, &self.stderr);
        let fail = |m: String| Err(MigrationError::Other(m));
        if !self.status.success() {
            return fail(format!("pgbench failed ({}):\n{stdout}\n{stderr}", self.status));
        }
        if stderr.contains("aborted") || stdout.contains("aborted") {
            return fail(format!("a pgbench client aborted:\n{stdout}\n{stderr}"));
        }
        let total = PGBENCH_CLIENTS as u64 * PGBENCH_TX_PER_CLIENT;
        let Some(processed) = pgbench_line(stdout, "number of transactions actually processed:") else {
            return fail(format!("no count in:\n{stdout}"));
        };
        if processed != format!("{total}/{total}") {
            return fail(format!("transactions processed: {processed}, expected {total}/{total}:\n{stdout}"));
        }
        let Some(failed) = pgbench_line(stdout, "number of failed transactions:") else {
            return fail(format!("no failure count in:\n{stdout}"));
        };
        if !failed.starts_with("0 ") {
            return fail(format!("failed transactions: {failed}"));
        }
        Ok(total)
    }
}

/// After a run that committed `total` transactions: pgbench_history holds
/// one row for each, the balances agree with the history, and the accounts
/// are all there.
pub fn check_history(sb: &mut ServiceBed, total: u64) -> Result<(), MigrationError> {
    let fail = |m: String| Err(MigrationError::Other(m));
    let rows = psql(sb, "SELECT count(*) FROM pgbench_history")?;
    if rows.parse::<u64>().ok() != Some(total) {
        return fail(format!("pgbench committed {total} transactions; pgbench_history holds {rows} rows"));
    }
    let sums = psql(
        sb,
        "SELECT (SELECT coalesce(sum(delta),0) FROM pgbench_history) || ' ' || (SELECT sum(abalance) FROM pgbench_accounts) \
         || ' ' || (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || (SELECT sum(bbalance) FROM pgbench_branches)",
    )?;
    let sums: Vec<&str> = sums.split_whitespace().collect();
    if !(sums.len() == 4 && sums.iter().all(|s| *s == sums[0])) {
        return fail(format!("balances disagree with the history (history, accounts, tellers, branches): {sums:?}"));
    }
    let accounts = psql(sb, "SELECT count(*) FROM pgbench_accounts")?;
    if accounts != "1000000" {
        return fail(format!("pgbench_accounts holds {accounts} rows, not 1000000"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn outcome(stdout: &str, code: i32) -> PgbenchOutcome {
        PgbenchOutcome { stdout: stdout.into(), stderr: String::new(), status: std::process::ExitStatus::from_raw(code << 8) }
    }

    const DONE: &str = "transaction type: <builtin: TPC-B (sort of)>\n\
        number of clients: 4\n\
        number of transactions per client: 3750\n\
        number of transactions actually processed: 15000/15000\n\
        number of failed transactions: 0 (0.000%)\n";

    #[test]
    fn pgbench_outcomes() {
        assert_eq!(outcome(DONE, 0).all_committed().unwrap(), 15000);
        let short = DONE.replace("15000/15000", "14990/15000");
        assert!(outcome(&short, 0).all_committed().unwrap_err().to_string().contains("14990/15000"));
        let failed = DONE.replace("failed transactions: 0 (0.000%)", "failed transactions: 3 (0.020%)");
        assert!(outcome(&failed, 0).all_committed().unwrap_err().to_string().contains("failed transactions: 3"));
        assert!(outcome(&format!("{DONE}client 2 aborted in command 4"), 0).all_committed().is_err());
        assert!(outcome(DONE, 2).all_committed().is_err());
    }
}
