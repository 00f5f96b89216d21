//! The `kube-userspace-proxy` binary: parse, set up logging, dispatch.

use std::process::ExitCode;

use clap::Parser;
use kube_userspace_proxy::cli::{Cli, Command};
use kube_userspace_proxy::{demo, init_logging, rules, run, status, ConfigError};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
