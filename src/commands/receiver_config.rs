//! The receiver's configuration file (`/etc/ctmigrate/receiver.toml`, or
//! `receive --config FILE`): the `receive` flags a service keeps, under the
//! flags' own names (docs/operations.md lists them). A flag given on the
//! command line overrides the file's key.
//!
//! A file with an unknown key, a value of the wrong type or a bad size is
//! refused whole, with one line naming the file and the key.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Deserializer};

use super::StageImages;

/// Read when `receive` has no `--config` (and no `--no-config`), if it
/// exists.
pub const DEFAULT_PATH: &str = "/etc/ctmigrate/receiver.toml";

/// Every key is optional: an absent one is left to the command line, then
/// to the flag's default.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReceiverConfig {
    pub listen: Option<String>,
    pub tls_dir: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub bridge: Option<String>,
    pub allow_bind_source: Option<Vec<PathBuf>>,
    #[serde(default, deserialize_with = "size")]
    pub max_bytes: Option<u64>,
    pub max_migrations: Option<usize>,
    pub stage_images: Option<StageImages>,
    #[serde(default, deserialize_with = "size")]
    pub staging_memory: Option<u64>,
    pub bundle_root: Option<PathBuf>,
    pub runtime_root: Option<PathBuf>,
    pub cgroup_parent: Option<String>,
    pub work_dir: Option<PathBuf>,
    pub timeout: Option<u64>,
    pub strip_setuid: Option<bool>,
    pub handshake_timeout: Option<u64>,
    pub max_handshakes: Option<usize>,
    pub max_handshakes_per_ip: Option<usize>,
    pub audit_log: Option<PathBuf>,
    pub journal_dir: Option<PathBuf>,
    pub json: Option<bool>,
    pub events: Option<PathBuf>,
    pub metrics: Option<String>,
}

/// A size as the flags take it: "256G" (K, M, G, T: powers of 1024) or a
/// number of bytes, given as a string or an integer.
fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let text = match Size::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a size: a number of bytes, or a string such as \"256G\" (K, M, G, T: powers of 1024)")
    })? {
        Size::Bytes(n) => return Ok(Some(n)),
        Size::Text(t) => t,
    };
    migration_engine::admission::parse_size(&text).map(Some).map_err(serde::de::Error::custom)
}

impl ReceiverConfig {
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| {
            // One line: the file, the key (read from the line the error's
            // span starts on) and toml's own short message.
            let message = e.message().replace('\n', " ");
            let place = match e.span() {
                Some(span) => {
                    let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    let line = text.lines().nth(line_no - 1).unwrap_or("");
                    match line.split_once('=').map(|(k, _)| k.trim().trim_matches('"')).filter(|k| !k.is_empty()) {
                        Some(key) if !line.trim_start().starts_with('[') => format!("line {line_no}, key `{key}`"),
                        _ => format!("line {line_no}"),
                    }
                }
                None => "the file".to_string(),
            };
            anyhow!("{}: {place}: {message}", path.display())
        })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// The file `receive` reads: `--config FILE` (which must exist), else
    /// the default path if it exists, else none (`--no-config`: none).
    pub fn find(explicit: Option<&Path>, no_config: bool) -> anyhow::Result<Option<(PathBuf, Self)>> {
        if no_config {
            return Ok(None);
        }
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => return Ok(None),
        };
        let cfg = Self::load(&path)?;
        Ok(Some((path, cfg)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<ReceiverConfig> {
        ReceiverConfig::parse(text, Path::new("/etc/ctmigrate/receiver.toml"))
    }

    fn refused(text: &str) -> String {
        let msg = parse(text).expect_err("refused").to_string();
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert!(msg.starts_with("/etc/ctmigrate/receiver.toml: "), "names the file: {msg}");
        msg
    }

    #[test]
    fn a_full_file_parses() {
        let cfg = parse(
            r#"
# a comment
listen = "0.0.0.0:7070"
tls-dir = "/etc/ctmigrate/tls"
bridge = "ctm0"
allow-bind-source = ["/srv/data", "/srv/logs"]
max-bytes = "64G"
max-migrations = 2
stage-images = "disk"
staging-memory = 1073741824
timeout = 90
events = "/var/log/ctmigrate/receiver-events.jsonl"
metrics = "127.0.0.1:9464"
"#,
        )
        .unwrap();
        assert_eq!(cfg.listen.as_deref(), Some("0.0.0.0:7070"));
        assert_eq!(cfg.allow_bind_source.as_ref().unwrap().len(), 2);
        assert_eq!(cfg.max_bytes, Some(64 << 30));
        assert_eq!(cfg.staging_memory, Some(1 << 30));
        assert_eq!(cfg.max_migrations, Some(2));
        assert!(matches!(cfg.stage_images, Some(StageImages::Disk)));
        assert_eq!(cfg.timeout, Some(90));
        assert_eq!(cfg.metrics.as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(cfg.insecure, None);
        assert_eq!(parse("").unwrap(), ReceiverConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_the_key() {
        let msg = refused("listen = \"0.0.0.0:7070\"\nmax-migratoins = 3\n");
        assert!(msg.contains("line 2, key `max-migratoins`") && msg.contains("unknown field"), "{msg}");
        let msg = refused("max-bytes = \"12Q\"\n");
        assert!(msg.contains("key `max-bytes`"), "{msg}");
        let msg = refused("max-bytes = true\n");
        assert!(msg.contains("key `max-bytes`") && msg.contains("expected a size"), "{msg}");
        let msg = refused("max-migrations = \"four\"\n");
        assert!(msg.contains("key `max-migrations`") && msg.contains("expected"), "{msg}");
        let msg = refused("max-migrations = -1\n");
        assert!(msg.contains("key `max-migrations`"), "{msg}");
        let msg = refused("stage-images = \"ram\"\n");
        assert!(msg.contains("key `stage-images`") && msg.contains("memory"), "{msg}");
        let msg = refused("[receiver]\nlisten = \"x\"\n");
        assert!(msg.contains("receiver"), "{msg}");
        let msg = refused("listen = \n");
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn the_shipped_example_parses() {
        let cfg = parse(include_str!("../../dist/receiver.toml.example")).unwrap();
        assert_eq!(cfg.listen.as_deref(), Some("0.0.0.0:7070"));
        assert_eq!(cfg.max_migrations, Some(4));
    }

    #[test]
    fn an_explicit_file_must_exist_the_default_one_need_not() {
        let err = ReceiverConfig::find(Some(Path::new("/nonexistent/receiver.toml")), false).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/receiver.toml"), "{err:#}");
        assert!(ReceiverConfig::find(Some(Path::new("/nonexistent/receiver.toml")), true).unwrap().is_none());
    }
}
