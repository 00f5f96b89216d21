//! The `kube-userspace-proxy` binary (also installed as `kube-proxy`):
//! parse (flags and `--config`), set up logging, dispatch.

use std::process::ExitCode;

use kube_userspace_proxy::cli::Command;
use kube_userspace_proxy::{config_file, demo, init_logging, rules, run, status, ConfigError};

/// glibc's malloc, without its slow path for over-aligned blocks
/// (`allocator`'s doc says why).
#[global_allocator]
static ALLOCATOR: kube_userspace_proxy::allocator::Allocator =
    kube_userspace_proxy::allocator::Allocator;

fn main() -> ExitCode {
    // Flags, then `--config` under them: a bad file exits 64 before anything starts.
    let (cli, notes) = match config_file::parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let (log, level) = match &cli.command {
        None => (&cli.run.log, "info"),
        Some(Command::Run(a)) | Some(Command::Rules(a)) => (&a.log, "info"),
        Some(Command::Demo(a)) => (&a.log, "warn"),
        Some(Command::Status(a)) => (&a.log, "warn"),
    };
    if let Err(e) = init_logging(log, level) {
        eprintln!("error: {e}");
        return ExitCode::from(64);
    }
    notes.log();
    // The control plane (discovery, run loop, admin, UDP): one thread. TCP
    // bytes move on the proxier's own worker threads (`--worker-threads`).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(1);
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            None => run(cli.run).await,
            Some(Command::Run(a)) => run(a).await,
            Some(Command::Demo(a)) => demo::run(a).await,
            Some(Command::Rules(a)) => rules(a).await,
            Some(Command::Status(a)) => status::run(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<ConfigError>() => {
            eprintln!("error: {e}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
