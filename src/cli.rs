//! The command line: one binary, one subcommand per component.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "hangar",
    version,
    about = "Host ML demo apps (Spaces: Gradio, Streamlit, Docker, static) on Kubernetes or one Docker engine"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "HANGAR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Default log level (RUST_LOG, when set, wins).
    #[arg(long, global = true, env = "HANGAR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Kubernetes operator: reconciles Space resources into workloads
    /// on the right hardware and keeps their status current.
    Operator(Box<crate::operator::OperatorArgs>),
    /// Run the proxy: routes each Space's traffic (host and path routing,
    /// WebSocket, SSE), puts idle Spaces to sleep and wakes them on request.
    Proxy(crate::proxy::ProxyArgs),
    /// Run the hub webhook receiver: a push to a Space's repository rebuilds
    /// and redeploys it.
    Webhook(crate::webhook::WebhookArgs),
    /// Run the node agent (a DaemonSet): freezes and thaws the Space pods of
    /// its node through their cgroups, and thaws them on the proxy's request.
    NodeAgent(crate::node_agent::NodeAgentArgs),
    /// Local mode: build and run the Spaces of a folder on this machine's
    /// Docker engine, served through the proxy; no cluster needed.
    Up(crate::local::UpArgs),
    /// Show the stage and URL of each Space of the running `hangar up`.
    Ls(crate::local::LsArgs),
    /// Print the Space CustomResourceDefinition as YAML (the source of crds/space.yaml).
    Crd,
}

fn tokio_runtime() -> crate::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Exit code of a command that is not built yet.
const NOT_IMPLEMENTED: u8 = 2;

/// Parses the arguments, runs the command, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, &cli.log_level);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err @ crate::Error::NotImplemented(_)) => {
            eprintln!("hangar: {err}");
            ExitCode::from(NOT_IMPLEMENTED)
        }
        Err(err) => {
            tracing::error!(error = %err, "hangar failed");
            eprintln!("hangar: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> crate::Result<()> {
    match command {
        Command::Crd => {
            print!("{}", crate::space::crd_yaml()?);
            Ok(())
        }
        Command::Operator(args) => tokio_runtime()?.block_on(crate::operator::run(*args)),
        Command::Proxy(args) => tokio::runtime::Runtime::new()?.block_on(crate::proxy::cli_run(args)),
        Command::Webhook(args) => tokio::runtime::Runtime::new()?.block_on(crate::webhook::serve(args)),
        Command::NodeAgent(args) => tokio_runtime()?.block_on(crate::node_agent::run(args)),
        Command::Up(args) => tokio_runtime()?.block_on(crate::local::run(args)),
        Command::Ls(args) => crate::local::ls(&args),
    }
}
