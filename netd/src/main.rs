use std::process::ExitCode;

use clap::Parser;
use netd::cli::{self, Cli, Command, Output};
use netd::client::ApiError;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::FdStore { socket } = &cli.command {
        return match netd::fdstore::serve(socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("netd fd-store: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Daemon(args) = cli.command {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("NETD_LOG")
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::io::stderr)
            .init();
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("netd: cannot start runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match runtime.block_on(netd::daemon::run(args, &cli.api, &cli.tls)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("netd daemon: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match cli::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match (cli.output, e.downcast_ref::<ApiError>()) {
                (Output::Json, Some(api)) => println!(
                    "{}",
                    serde_json::json!({"error": api.message, "code": api.code, "status": api.status})
                ),
                (_, Some(api)) => eprintln!("Error: {api}"),
                _ => eprintln!("Error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
