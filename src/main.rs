//! `ctmigrate`: the command line. `main` parses and dispatches; each
//! subcommand's arguments and its call into the libraries are in
//! [`commands`].

mod commands;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use commands::{certs, check, evacuate, generate, guard, hook, journal, receive, send, validate};

#[derive(Parser)]
#[command(name = "ctmigrate", version, about = "Live-migrate a running runc container to another host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate running containers to a receiver (several at once, those
    /// sharing a network namespace as one pod).
    Send(send::SendArgs),
    /// Migrate every running container of a runtime root to a receiver,
    /// several at once; a summary says which moved and which stayed.
    Evacuate(evacuate::EvacuateArgs),
    /// Accept migrations and restore them here.
    Receive(receive::ReceiveArgs),
    /// List the migrations on this host that are in flight or in doubt.
    Status(journal::StatusArgs),
    /// Settle a migration left in doubt: ask the other host what it did
    /// and act on it, or keep one copy by hand.
    Resolve(journal::ResolveArgs),
    /// Certificates for authenticated, encrypted migrations.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// Check that this host can send and receive migrations.
    Check(check::CheckArgs),
    /// Migrate a container between two local network-namespace hosts (a
    /// fixture, or a real service under its client), check it survived,
    /// and remove everything.
    Validate(validate::ValidateArgs),
    /// OCI runtime hooks (state JSON on stdin); see docs/hooks.md.
    Hook {
        #[command(subcommand)]
        command: hook::HookCommand,
    },
    /// Man pages and shell completions, from this command line's own
    /// definitions (install.sh installs them).
    Generate {
        #[command(subcommand)]
        command: generate::GenerateCommand,
    },
    /// Internal: the freeze guard a sender starts (see migration-engine's
    /// guard module).
    #[command(name = "__guard", hide = true)]
    Guard(guard::GuardArgs),
    /// Internal: the lease guard a receiver starts for a post-copy copy
    /// (see migration-engine's lease_guard module).
    #[command(name = "__lease-guard", hide = true)]
    LeaseGuard(guard::LeaseGuardArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Send(_) | Command::Evacuate(_) | Command::Receive(_)) {
        migration_engine::interrupt::install();
    }
    match cli.command {
        Command::Send(args) => args.run(),
        Command::Evacuate(args) => args.run(),
        Command::Receive(args) => args.run(),
        Command::Status(args) => args.run(),
        Command::Resolve(args) => args.run(),
        Command::Certs { command } => command.run(),
        Command::Check(args) => args.run(),
        Command::Validate(args) => args.run(),
        Command::Hook { command } => command.run(),
        Command::Generate { command } => command.run(Cli::command()),
        Command::Guard(args) => args.run(),
        Command::LeaseGuard(args) => args.run(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    fn send_options(args: &[&str]) -> migration_engine::SendOptions {
        let mut argv = vec!["ctmigrate", "send", "web", "--to", "tcp://10.0.0.2:7070"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Send(a) => a.options(),
            _ => unreachable!("parsed as send"),
        }
    }

    #[test]
    fn send_arguments_become_the_engines_options() {
        let o = send_options(&["--bwlimit", "50M", "--timeout", "7", "--mode", "stop-copy", "--insecure"]);
        assert_eq!(o.container, "web");
        assert_eq!(o.to.to_string(), "tcp://10.0.0.2:7070");
        assert_eq!(o.bwlimit.map(|r| r.bytes_per_s()), Some(50_000_000));
        assert_eq!(o.io_timeout, std::time::Duration::from_secs(7));
        assert_eq!(o.mode, migration_engine::precopy::ModeRequest::StopCopy);
        assert!(matches!(o.security, migration_engine::tls::Security::Insecure));
        assert_eq!(o.in_doubt_timeout, std::time::Duration::from_secs(120));
    }

    #[test]
    fn several_containers_and_evacuate_take_the_same_migration_options() {
        let parsed = Cli::try_parse_from(["ctmigrate", "send", "a", "b", "--to", "tcp://h:1", "--parallel", "3", "--bwlimit", "10M"]).unwrap();
        match parsed.command {
            Command::Send(a) => {
                assert_eq!(a.containers, ["a", "b"]);
                assert_eq!(a.fleet.parallel, Some(3));
            }
            _ => unreachable!("parsed as send"),
        }
        match Cli::try_parse_from(["ctmigrate", "evacuate", "--to", "tcp://h:1", "--runtime-root", "/run/x", "--json"]).unwrap().command {
            Command::Evacuate(a) => {
                assert_eq!(a.fleet.parallel, None);
                let o = a.migration.options("web".into(), None);
                assert_eq!(o.runtime_root, std::path::PathBuf::from("/run/x"));
            }
            _ => unreachable!("parsed as evacuate"),
        }
        for bad in [&["ctmigrate", "send", "--to", "tcp://h:1"][..], &["ctmigrate", "evacuate", "--to", "tcp://h:1", "--parallel", "0"]] {
            assert_eq!(Cli::try_parse_from(bad).err().expect("refused").exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn bad_destinations_and_sizes_are_refused_by_the_parser() {
        let err = Cli::try_parse_from(["ctmigrate", "send", "web", "--to", "http://x"]).err().expect("refused");
        assert!(err.to_string().contains("expected tcp://HOST:PORT"), "{err}");
        let err = Cli::try_parse_from(["ctmigrate", "receive", "--listen", "0.0.0.0:1", "--max-bytes", "12Q"]).err().expect("refused");
        assert_eq!(err.exit_code(), 2);
        match Cli::try_parse_from(["ctmigrate", "receive", "--listen", "0.0.0.0:1", "--max-bytes", "2G"]).unwrap().command {
            Command::Receive(a) => assert_eq!(a.options().max_bytes, 2 << 30),
            _ => unreachable!("parsed as receive"),
        }
    }

    fn receive_settings(args: &[&str], file: &str) -> anyhow::Result<commands::receive::Settings> {
        let mut argv = vec!["ctmigrate", "receive"];
        argv.extend_from_slice(args);
        let path = std::path::PathBuf::from("/etc/ctmigrate/receiver.toml");
        let cfg = commands::receiver_config::ReceiverConfig::parse(file, &path).unwrap();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Receive(a) => a.settings(Some((path, cfg))),
            _ => unreachable!("parsed as receive"),
        }
    }

    #[test]
    fn the_configuration_file_sets_what_the_flags_do_not() {
        let file = r#"
listen = "127.0.0.1:7070"
tls-dir = "/srv/tls"
bridge = "ctm0"
allow-bind-source = ["/srv/a"]
max-bytes = "1G"
max-migrations = 2
stage-images = "disk"
staging-memory = "512M"
timeout = 90
json = true
events = "/var/log/ctmigrate/events.jsonl"
"#;
        let s = receive_settings(&[], file).unwrap();
        let o = &s.opts;
        assert_eq!(o.listen, "127.0.0.1:7070");
        assert!(matches!(&o.security, migration_engine::tls::Security::Tls(d) if d == std::path::Path::new("/srv/tls")));
        assert_eq!(o.bridge.as_deref(), Some("ctm0"));
        assert_eq!(o.allowed_bind_sources, vec![std::path::PathBuf::from("/srv/a")]);
        assert_eq!((o.max_bytes, o.max_migrations, o.staging_memory), (1 << 30, 2, Some(512 << 20)));
        assert_eq!(o.stage_images, migration_engine::scratch::StageMode::Disk);
        assert_eq!(o.io_timeout, std::time::Duration::from_secs(90));
        assert!(s.json);
        assert_eq!(s.events.as_deref(), Some(std::path::Path::new("/var/log/ctmigrate/events.jsonl")));
        // Unset keys keep the flags' defaults.
        assert_eq!(o.runtime_root, std::path::PathBuf::from("/run/runc"));
        assert_eq!(o.handshake_timeout, std::time::Duration::from_secs(10));

        // Flags override the file, key by key.
        let s = receive_settings(
            &["--listen", "127.0.0.1:9", "--max-bytes", "2G", "--max-migrations", "7", "--allow-bind-source", "/srv/b", "--insecure"],
            file,
        )
        .unwrap();
        let o = &s.opts;
        assert_eq!(o.listen, "127.0.0.1:9");
        assert_eq!((o.max_bytes, o.max_migrations), (2 << 30, 7));
        assert_eq!(o.allowed_bind_sources, vec![std::path::PathBuf::from("/srv/b")]);
        assert!(matches!(o.security, migration_engine::tls::Security::Insecure));
        assert_eq!(o.bridge.as_deref(), Some("ctm0"), "what the flags leave is the file's");

        // --stdio ignores the file's listen address and JSON (its stdout is the stream).
        let s = receive_settings(&["--stdio"], file).unwrap();
        assert!(s.stdio && !s.json && s.opts.listen.is_empty());

        // Nowhere to listen: a usage error that names the file.
        let err = receive_settings(&[], "bridge = \"ctm0\"\n").err().expect("refused").to_string();
        assert!(err.contains("--listen") && err.contains("/etc/ctmigrate/receiver.toml"), "{err}");
    }

    /// Each visible command's path of names ("certs init"), with the
    /// command itself.
    fn visible_commands(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            visible_commands(sub, p.clone(), out);
            out.push((p, sub.clone()));
        }
    }

    #[test]
    fn every_subcommand_has_a_man_page_naming_its_flags() {
        let dir = tempfile::tempdir().unwrap();
        let pages = commands::generate::write_man_pages(Cli::command(), dir.path()).unwrap();
        assert!(pages.contains(&dir.path().join("ctmigrate.1")), "{pages:?}");
        let mut subs = Vec::new();
        visible_commands(&Cli::command(), Vec::new(), &mut subs);
        assert!(subs.iter().any(|(p, _)| p == &["receive"]) && subs.iter().any(|(p, _)| p == &["certs", "init"]));
        assert!(!subs.iter().any(|(p, _)| p[0].starts_with("__")), "hidden commands have no page");
        for (path, cmd) in &subs {
            let page = dir.path().join(format!("ctmigrate-{}.1", path.join("-")));
            let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
            // roff escapes the hyphens of flags (\-\-listen).
            let text = text.replace('\\', "");
            assert!(text.contains(&format!("ctmigrate-{}", path.join("-"))), "{} names its command", page.display());
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    assert!(text.contains(&format!("--{long}")), "{} does not mention --{long}", page.display());
                }
            }
        }
        // No stray pages for hidden or removed commands.
        assert_eq!(pages.len(), subs.len() + 1, "{pages:?}");
    }

    #[test]
    fn completion_scripts_parse() {
        use clap_complete::Shell;
        let dir = tempfile::tempdir().unwrap();
        for (shell, exe) in [(Shell::Bash, "bash"), (Shell::Zsh, "zsh"), (Shell::Fish, "fish")] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ctmigrate", &mut script);
            let text = String::from_utf8(script).unwrap();
            assert!(text.contains("receive") && text.contains("listen"), "{shell}: {text}");
            let file = dir.path().join(format!("ctmigrate.{exe}"));
            std::fs::write(&file, &text).unwrap();
            match std::process::Command::new(exe).arg("-n").arg(&file).output() {
                Ok(out) => assert!(out.status.success(), "{exe} -n: {}", String::from_utf8_lossy(&out.stderr)),
                // bash is always there (the tests' own scripts need it).
                Err(e) if shell != Shell::Bash && e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("SKIPPED: {exe} -n (no {exe} on this host)")
                }
                Err(e) => panic!("{exe}: {e}"),
            }
        }
    }
}
