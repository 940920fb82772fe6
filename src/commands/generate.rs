//! `ctmigrate generate`: man pages and shell completions, made from the
//! command line's own (clap) definitions, so that they never disagree
//! with `--help`. install.sh writes them to the system's directories.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{exit, fail};

#[derive(clap::Subcommand)]
pub enum GenerateCommand {
    /// Write the man pages (section 1) to DIR: ctmigrate.1, and one per
    /// subcommand (ctmigrate-send.1, ctmigrate-certs-init.1, ...).
    Man {
        /// Output directory (created if missing; pages in it are replaced).
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

impl GenerateCommand {
    /// `cli` is the whole command line's definition (the caller's
    /// `Cli::command()`).
    pub fn run(self, cli: clap::Command) -> ExitCode {
        match self {
            GenerateCommand::Man { dir } => match write_man_pages(cli, &dir) {
                Ok(pages) => {
                    for p in pages {
                        println!("{}", p.display());
                    }
                    ExitCode::from(exit::OK)
                }
                Err(e) => fail(format!("cannot write the man pages to {}: {e}", dir.display()), exit::INTERNAL),
            },
            GenerateCommand::Completions { shell } => {
                let mut cli = cli;
                let name = cli.get_name().to_string();
                clap_complete::generate(shell, &mut cli, name, &mut std::io::stdout());
                ExitCode::from(exit::OK)
            }
        }
    }
}

/// Every page `generate man` writes: the command's and each visible
/// subcommand's, nested ones too (hidden ones, such as the internal
/// guards, have none). Returns the ctmigrate pages in `dir`, sorted.
pub fn write_man_pages(cli: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cli, dir)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "1")
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ctmigrate"))
        })
        .collect();
    pages.sort();
    Ok(pages)
}
