//! `ctmigrate validate`: a whole migration between two local hosts.
//!
//! Creates two network-namespace hosts with separate runtime and bundle
//! roots, starts the counter fixture on one, migrates it to the other over
//! TCP with this very binary on both sides, checks that it kept counting
//! from where it was (same token, higher count), and removes everything,
//! also on failure.

use std::time::Duration;

use crate::events::{Event, ResultEvent};
use crate::testbed::{read_counter, wait_for, Testbed, Workload};
use crate::{MigrationError, Reporter};

#[derive(Debug, Clone, Default)]
pub struct ValidateOptions {}

pub fn run(_opts: &ValidateOptions, rep: &Reporter) -> Result<(), MigrationError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(MigrationError::Preflight("validate creates network namespaces and containers: run it as root".into()));
    }
    let exe = std::env::current_exe().map_err(MigrationError::io("locating the ctmigrate binary"))?;
    let outcome = (|| {
        let bed = Testbed::create("val", &exe)?;
        let id = format!("ctmigrate-validate-{}", bed.tag);
        let src = bed.start_fixture(&id, &Workload::Counter)?;
        let (token, before) = wait_for(Duration::from_secs(10), || read_counter(&src.rootfs()).filter(|(_, n)| *n >= 10))
            .ok_or_else(|| MigrationError::Other("the fixture container did not start counting".into()))?;
        rep.warn(format!("fixture {id} counting on the source host ({before})"));

        let port = 7400 + (std::process::id() % 500) as u16;
        let mut receiver = bed.spawn_receiver(port, &["--once"], &[])?;
        let sent = bed.run_sender(&id, port, &[], &[])?;
        let recv_code = receiver.wait(Duration::from_secs(60));
        let sender_result = sent.result().cloned().unwrap_or_default();
        if sent.code != Some(0) {
            return Err(MigrationError::Other(format!(
                "send failed (exit {:?}): {}; receiver: {}",
                sent.code,
                sent.stderr.trim(),
                receiver.stderr().trim()
            )));
        }
        if recv_code != Some(0) {
            return Err(MigrationError::Other(format!("receive failed (exit {recv_code:?}): {}", receiver.stderr().trim())));
        }
        if bed.src_runc.exists(&id)? {
            return Err(MigrationError::Other("the source container still exists after migration".into()));
        }
        let dst = bed.dst_container(&id);
        let state = dst.runc.running(&id)?;
        let (tok2, after) = wait_for(Duration::from_secs(10), || read_counter(&dst.rootfs()).filter(|(_, n)| *n > before + 5))
            .ok_or_else(|| MigrationError::Other("the migrated container does not count on the destination".into()))?;
        if tok2 != token {
            return Err(MigrationError::Other(format!(
                "the container restarted instead of migrating (token {token} became {tok2})"
            )));
        }
        rep.warn(format!("{id} runs on the destination (pid {}), counter {before} → {after}, same token", state.pid));
        Ok::<_, MigrationError>(sender_result)
    })();
    // The testbed and containers are gone here (dropped inside the closure).
    let mut result = ResultEvent { role: "validate", mode: "stop-copy".into(), ..Default::default() };
    match &outcome {
        Ok(s) => {
            result.ok = true;
            result.container = s["container"].as_str().unwrap_or_default().to_string();
            result.dest_id = s["dest_id"].as_str().unwrap_or_default().to_string();
            result.frozen_ms = s["frozen_ms"].as_u64();
            result.total_ms = s["total_ms"].as_u64().unwrap_or(0);
            result.bytes_sent = s["bytes_sent"].as_u64().unwrap_or(0);
            result.bytes_raw = s["bytes_raw"].as_u64().unwrap_or(0);
            result.image_bytes = s["image_bytes"].as_u64().unwrap_or(0);
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    rep.emit(Event::Result(result));
    outcome.map(|_| ())
}
