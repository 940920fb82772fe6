//! `send --to ssh://`: a real sshd, started by the test inside the
//! destination's network namespace with keys the test generates, runs
//! `ctmigrate receive --stdio` for the sender's ssh.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use migration_testbed::{ChildProcess, HostPair};

struct Sshd {
    dir: PathBuf,
    port: u16,
    _process: ChildProcess,
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).status().unwrap();
    assert!(st.success());
}

impl Sshd {
    fn start(bed: &Testbed) -> Self {
        let dir = bed.dir.join("ssh");
        std::fs::create_dir_all(&dir).unwrap();
        keygen(&dir.join("host_key"));
        keygen(&dir.join("user_key"));
        keygen(&dir.join("other_key"));
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
        let port = port() + 300;
        let config = format!(
            "Port {port}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {}\n",
            bed.hosts.dst_ip,
            dir.join("host_key").display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap(); // sshd's privilege separation directory
        let mut cmd = HostPair::command_in(&bed.hosts.dst, "/usr/sbin/sshd");
        cmd.arg("-D").arg("-e").arg("-f").arg(dir.join("sshd_config"));
        let process = ChildProcess::spawn(cmd).unwrap();
        // Ready when it accepts connections.
        let addr: std::net::SocketAddr = format!("{}:{port}", bed.hosts.dst_ip).parse().unwrap();
        wait_for(Duration::from_secs(10), || migration_testbed::connect_from(&bed.hosts.src, addr).ok())
            .unwrap_or_else(|| panic!("sshd did not start: {}", process.stderr()));
        let host_pub = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        std::fs::write(dir.join("known_hosts"), format!("[{}]:{port} {host_pub}", bed.hosts.dst_ip)).unwrap();
        let other_pub = std::fs::read_to_string(dir.join("other_key.pub")).unwrap();
        std::fs::write(dir.join("wrong_known_hosts"), format!("[{}]:{port} {other_pub}", bed.hosts.dst_ip)).unwrap();
        Sshd { dir, port, _process: process }
    }

    /// Sender arguments for this sshd, with `key` and `known_hosts`.
    fn send_args(&self, bed: &Testbed, key: &str, known_hosts: &str) -> Vec<String> {
        let remote = format!(
            "{} receive --stdio --bundle-root {} --runtime-root {} --cgroup-parent {} --work-dir {} --audit-log {}",
            EXE,
            bed.dst_bundles().display(),
            bed.dst_runc.root.display(),
            bed.cgroup_parent,
            bed.dst_work().display(),
            bed.audit_log("dst").display()
        );
        vec![
            "--ssh-opt".into(),
            format!("IdentityFile={}", self.dir.join(key).display()),
            "--ssh-opt".into(),
            "IdentitiesOnly=yes".into(),
            "--ssh-opt".into(),
            format!("UserKnownHostsFile={}", self.dir.join(known_hosts).display()),
            "--ssh-opt".into(),
            "StrictHostKeyChecking=yes".into(),
            "--remote-command".into(),
            remote,
        ]
    }
}

fn send_over_ssh(bed: &Testbed, sshd: &Sshd, id: &str, key: &str, known_hosts: &str) -> migration_testbed::CommandResult {
    let mut cmd = HostPair::command_in(&bed.hosts.src, EXE);
    cmd.args(["send", id, "--to", &format!("ssh://root@{}:{}", bed.hosts.dst_ip, sshd.port)])
        .arg("--runtime-root")
        .arg(&bed.src_runc.root)
        .arg("--work-dir")
        .arg(bed.src_work())
        .arg("--audit-log")
        .arg(bed.audit_log("src"))
        .arg("--json")
        .args(sshd.send_args(bed, key, known_hosts));
    migration_testbed::CommandResult::run(cmd).unwrap()
}

#[test]
fn counter_migrates_over_ssh() {
    let Some(bed) = testbed("ssh") else { return };
    let sshd = Sshd::start(&bed);
    let id = format!("sshc-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, before) = counter_at_least(&src.rootfs(), 10);
    let r = send_over_ssh(&bed, &sshd, &id, "user_key", "known_hosts");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!bed.src_runc.exists(&id).unwrap(), "the source still exists");
    let dst = bed.dst_container(&id);
    dst.runc.running(&id).expect("the container runs on the destination");
    let (tok, first) = read_counter(&dst.rootfs()).unwrap();
    assert_eq!(tok, token);
    assert!(first >= before);
    assert_counting_on(&dst.rootfs(), &token, first);
    let audit = std::fs::read_to_string(bed.audit_log("dst")).unwrap();
    assert!(audit.contains("\"peer\":\"ssh:root@"), "{audit}");
}

#[test]
fn wrong_host_key_or_refused_login_fails_cleanly() {
    let Some(bed) = testbed("ssf") else { return };
    let sshd = Sshd::start(&bed);
    let id = format!("sshf-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 3);

    let r = send_over_ssh(&bed, &sshd, &id, "user_key", "wrong_known_hosts");
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("Host key verification failed"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);

    let r = send_over_ssh(&bed, &sshd, &id, "other_key", "known_hosts");
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);

    assert_eq!(frozen_state(&bed, &id), "THAWED");
    let (_, n) = read_counter(&src.rootfs()).unwrap();
    assert_counting_on(&src.rootfs(), &token, n);
    assert_clean(&bed, &id);
}
