//! The command line of `sdxl-lora` and of every example: each declares its flags with clap's derive and hands its
//! body to [`run`], so that all of them answer alike:
//!
//! * `--help` / `-h`: the usage, every flag with its description and default, on stdout; exit 0.
//! * A usage error (an unknown flag, a missing or unparsable value, a missing argument, values that
//!   contradict each other): one line `error: …` naming the flag, then `Run '<name> --help' for
//!   usage.`, on stderr; exit 2.
//! * An error while running (a missing file, …): `error: ` and the error's causes on one line; exit 1.
//!
//! No backtrace either way, whatever `RUST_BACKTRACE` says: `main` returns an exit code, not the error.
//! `train` parses diffusers' flags with `trainer::TrainConfig` and uses [`UsageError`] and
//! [`finish`] only.
//!
//! The subcommands' bodies live here so that the `sdxl-lora` binary and the examples run the same
//! code; [`init_logging`] installs the `tracing` subscriber both print the libraries' messages with.

pub mod convert;
pub mod estimate;
pub mod generate;
pub mod infotext;
pub mod inspect;
pub mod train;

use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, Command, Parser, ValueEnum};
use tch::Kind;

/// A usage mistake found after parsing (`--compare` without `--lora`, …): reported as clap's own are.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Parses the command line into `A` and runs `example` with it, exiting as the module says.
pub fn run<A: Parser>(example: impl FnOnce(A) -> anyhow::Result<()>) -> ExitCode {
    let mut command = with_policies(A::command());
    let name = command.get_name().to_owned();
    let parsed = match command.try_get_matches_from_mut(std::env::args_os()) {
        Ok(mut matches) => {
            A::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut command))
        }
        Err(error) => Err(error),
    };
    match parsed {
        Ok(args) => finish(&name, example(args)),
        Err(error) if error.kind() == ErrorKind::DisplayHelp => {
            // clap prints the help to stdout; a closed pipe (`| head`) is no failure.
            let _ = error.print();
            ExitCode::SUCCESS
        }
        Err(error) => usage_failure(&name, &one_line(&error)),
    }
}

/// What every example's command line does beyond clap's defaults: a flag given twice keeps its last
/// value (as the hand-written parsers did), a negative number is a value (so `--steps -1` is reported
/// as a bad `--steps`), and a missing subcommand is a usage error like any other, not the help.
fn with_policies(command: Command) -> Command {
    fn negative_numbers(arg: Arg) -> Arg {
        let takes_values = arg.get_action().takes_values();
        arg.allow_negative_numbers(takes_values)
    }
    command
        .args_override_self(true)
        .arg_required_else_help(false)
        .mut_args(negative_numbers)
        .mut_subcommands(|sub| sub.args_override_self(true).mut_args(negative_numbers))
}

/// The exit of example `name` after its body returned `result`: a [`UsageError`] exits 2, any other
/// error 1.
pub fn finish(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => match error.downcast_ref::<UsageError>() {
            Some(usage) => usage_failure(name, &usage.0),
            None => {
                eprintln!("error: {}", chain(&error));
                ExitCode::FAILURE
            }
        },
    }
}

/// The error and its causes on one line, leaving out a cause whose text the line already holds (many
/// of our errors print their source in their own message too).
fn chain(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// The value of `flag` given as `FLAG VALUE` or `FLAG=VALUE` anywhere in `args`, both taken out of
/// `args` (for the flags read before the rest of the line is parsed); `needs` completes the usage
/// error of a flag without its value.
pub(crate) fn take_flag(
    args: &mut Vec<String>,
    flag: &str,
    needs: &str,
) -> anyhow::Result<Option<String>> {
    let joined = format!("{flag}=");
    let Some(i) = args
        .iter()
        .position(|a| a == flag || a.starts_with(&joined))
    else {
        return Ok(None);
    };
    let given = args.remove(i);
    match given.strip_prefix(&joined) {
        Some(value) => Ok(Some(value.to_owned())),
        None if i < args.len() => Ok(Some(args.remove(i))),
        None => anyhow::bail!(UsageError(format!("{flag} needs {needs}"))),
    }
}

fn usage_failure(name: &str, message: &str) -> ExitCode {
    eprintln!("error: {message} (run '{name} --help' for usage)");
    ExitCode::from(2)
}

/// clap's message without its usage and hints: the lines before the first blank one (a list of
/// missing arguments or possible values continues indented), joined, and a suggested flag or
/// subcommand.
fn one_line(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let message = rendered.split("\n\n").next().unwrap_or_default();
    let mut line = message.lines().map(str::trim).collect::<Vec<_>>().join(" ");
    if let Some(stripped) = line.strip_prefix("error: ") {
        line = stripped.to_owned();
    }
    if let Some(ContextValue::String(flag)) = error.get(ContextKind::SuggestedArg) {
        line.push_str(&format!(" (did you mean '{flag}'?)"));
    }
    if let Some(ContextValue::Strings(names)) = error.get(ContextKind::SuggestedSubcommand)
        && let Some(name) = names.first()
    {
        line.push_str(&format!(" (did you mean '{name}'?)"));
    }
    line
}

/// How much the libraries' `tracing` events say: `--quiet`, the default, `--verbose`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Warnings and errors only.
    Quiet,
    /// The run's story (info) and above.
    Normal,
    /// Debug messages too.
    Verbose,
}

/// How the libraries' `tracing` events are written on stderr (`--log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// The message alone, one line each, as the programs always printed it.
    Text,
    /// One JSON object per event (timestamp, level, target, fields).
    Json,
}

/// Installs the process's `tracing` subscriber: events at `verbosity`'s level and above, on stderr,
/// in `format`. The text format prints the message alone (no time, level or target), so that the
/// lines read as they did when the libraries printed them. Does nothing when a subscriber is
/// installed already.
pub fn init_logging(verbosity: Verbosity, format: LogFormat) {
    let level = match verbosity {
        Verbosity::Quiet => tracing::Level::WARN,
        Verbosity::Normal => tracing::Level::INFO,
        Verbosity::Verbose => tracing::Level::DEBUG,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Text => builder
            .without_time()
            .with_level(false)
            .with_target(false)
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The models' element type, as the examples' `--kind` flag names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
    /// float32.
    F32,
}

impl From<Precision> for Kind {
    fn from(precision: Precision) -> Self {
        match precision {
            Precision::Bf16 => Kind::BFloat16,
            Precision::F16 => Kind::Half,
            Precision::F32 => Kind::Float,
        }
    }
}
