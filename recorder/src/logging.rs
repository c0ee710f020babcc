//! Logging setup: `tracing` with an env-filter from the configuration (overridable by `RUST_LOG`),
//! text or JSON lines on stderr so stdout stays free for the CLI's own output.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// matrix-sdk logs expected conditions at error level (a 404 for account data nobody has set yet,
/// on every start); unless the configured filter names these crates itself, they are kept to
/// warnings and an HTTP client's "errors" to nothing.
const QUIET: &[(&str, &str)] = &[
    ("matrix_sdk::http_client", "off"),
    ("matrix_sdk", "warn"),
    ("matrix_sdk_base", "warn"),
    ("matrix_sdk_crypto", "warn"),
    ("matrix_sdk_sqlite", "warn"),
];

pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(with_quiet_defaults(&cfg.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore the error it returns.
    let _ = if cfg.json { builder.json().try_init() } else { builder.try_init() };
}

fn with_quiet_defaults(level: &str) -> String {
    let mut directives = vec![level.to_string()];
    for (target, quiet) in QUIET {
        if !level.contains(target) {
            directives.push(format!("{target}={quiet}"));
        }
    }
    directives.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn noisy_crates_are_quiet_unless_named() {
        let f = super::with_quiet_defaults("info");
        assert!(f.starts_with("info,") && f.contains("matrix_sdk=warn"), "{f}");
        let f = super::with_quiet_defaults("info,matrix_sdk=debug");
        assert!(f.contains("matrix_sdk=debug") && !f.contains("matrix_sdk=warn"), "{f}");
    }
}
