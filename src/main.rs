//! Thin entry point: parse the command line, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    postback_relay::cli::main(postback_relay::cli::Cli::parse())
}
