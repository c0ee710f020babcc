//! `mxrec`: the command line of the recorder. Each subcommand is a thin shell over the library
//! code in this crate, `transcoder` and `storage`; this file only parses arguments, loads the
//! configuration, sets up logging and prints results.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use recorder::config::Config;

#[derive(Parser)]
#[command(name = "mxrec", version, about = "Records Matrix calls: per-track files, one composite MP4, links in the room")]
struct Cli {
    /// Configuration file (TOML). Without one the embedded defaults apply (SQLite + local files
    /// under ./data); `MXREC_<SECTION>__<KEY>` environment variables override either.
    #[arg(long, short, global = true, env = "MXREC_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and explain every problem found.
    CheckConfig,
    /// Record media files as one call: each participant's file is cut into codec-copy segments,
    /// uploaded, catalogued, and composed into one MP4, exactly as a live call would be.
    Import {
        /// Room the recording belongs to (any label; a Matrix room id for real calls).
        #[arg(long)]
        room: String,
        /// `ID[#Display Name]=FILE[@JOIN_SECONDS]`, one per participant; a file may hold audio
        /// and video (Opus, VP8, VP9, H.264 or AV1). JOIN_SECONDS offsets it on the call's clock.
        #[arg(long = "participant", short = 'p', required = true)]
        participants: Vec<String>,
    },
    /// Re-render the composite of a stored recording from its manifest.
    Export {
        /// A manifest: a local path, or an object key in the configured store.
        #[arg(long)]
        manifest: String,
        /// Output file (.mp4, or .m4a for an audio-only recording).
        #[arg(long)]
        out: PathBuf,
    },
    /// List recordings in the catalog, newest first.
    Recordings {
        /// Only this room's recordings.
        #[arg(long)]
        room: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Share links to a recording's files (served by `mxrec serve`).
    Links {
        #[command(subcommand)]
        command: LinksCommand,
    },
    /// Run the HTTP server (share links, /healthz, /metrics) until SIGINT or SIGTERM.
    Serve,
    /// Run the recording bot (`[matrix]` section) together with the HTTP server until SIGINT or
    /// SIGTERM; then hang up every call, store the recordings and exit.
    Run,
    /// Ask the running bot (same configuration: its control socket is `<data_dir>/mxrec.sock`) to
    /// record the MatrixRTC call of a room it is in, now or when the next one starts.
    Record {
        /// The room's id, e.g. '!abc:example.org'.
        #[arg(long)]
        room: String,
        /// Stop recording that room's call instead (the recording is stored and linked).
        #[arg(long)]
        stop: bool,
    },
}

#[derive(Subcommand)]
enum LinksCommand {
    /// Issue links to a stored recording and print them, one per line.
    Create {
        recording_id: String,
        /// Which files: the composite, the manifest, or every segment of every track.
        #[arg(long, value_enum, default_value = "composite")]
        what: recorder::http::What,
        /// Lifetime in hours; default `http.link_ttl_hours`.
        #[arg(long)]
        ttl_hours: Option<u64>,
    },
    /// Revoke every link of a recording and print how many were revoked.
    Revoke { recording_id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("mxrec: the configuration cannot be read:");
            for p in problems {
                eprintln!("  {p}");
            }
            return ExitCode::from(2);
        }
    };
    if let Command::CheckConfig = cli.command {
        return check_config(&config, cli.config.as_deref());
    }
    recorder::logging::init(&config.log);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mxrec: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxrec: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(config: &Config, path: Option<&std::path::Path>) -> ExitCode {
    let problems = config.validate();
    let source = path.map_or("embedded defaults".to_string(), |p| p.display().to_string());
    if problems.is_empty() {
        println!("{source}: OK");
        println!("  catalog: {}", config.catalog_url());
        println!("  storage: {}", recorder::pipeline::describe_store(&config.storage));
        println!("  spool:   {}", config.spool_dir().display());
        println!("  http:    {} (links: {}/r/…)", config.http.bind, config.http.public_base());
        ExitCode::SUCCESS
    } else {
        eprintln!("{source}: {} problem(s)", problems.len());
        for p in problems {
            eprintln!("  {p}");
        }
        ExitCode::from(2)
    }
}

async fn run(command: Command, config: Config) -> Result<()> {
    match command {
        Command::CheckConfig => unreachable!("handled before the runtime starts"),
        Command::Import { room, participants } => {
            let specs = participants
                .iter()
                .map(|s| recorder::cli_import::ParticipantFile::parse(s))
                .collect::<Result<Vec<_>>>()?;
            let env = std::sync::Arc::new(recorder::pipeline::Env::open(&config).await?);
            let done = recorder::cli_import::import(&env, &room, specs).await?;
            println!("recording: {}", done.recording_id);
            println!("manifest:  {}", done.manifest_location);
            for c in &done.composites {
                println!("composite: {c}");
            }
            if let Ok(env) = std::sync::Arc::try_unwrap(env) {
                env.shutdown().await;
            }
            Ok(())
        }
        Command::Export { manifest, out } => {
            recorder::export::export(&config, &manifest, &out)
                .await
                .with_context(|| format!("exporting {manifest}"))?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Recordings { room, limit } => {
            // Only the catalog: listing must not start uploads or take the spool.
            let catalog = storage::Catalog::connect(&config.catalog_url()).await?;
            let rows = match room {
                Some(room) => catalog.recent_recordings(&storage::RoomId::new(room), limit).await?,
                None => catalog.all_recent_recordings(limit).await?,
            };
            for r in rows {
                println!(
                    "{}  {}  {:<10}  {}  {}",
                    r.id,
                    r.room_id,
                    r.state.as_str(),
                    storage::manifest::wall_clock(r.started_at_ms, 0).format("%Y-%m-%d %H:%M:%S"),
                    r.manifest_key.as_deref().unwrap_or("-")
                );
            }
            catalog.close().await;
            Ok(())
        }
        Command::Links { command } => links(command, &config).await,
        Command::Serve => serve(&config).await,
        Command::Run => recorder::bot::run(config, recorder::http::shutdown_signal()).await,
        Command::Record { room, stop } => {
            use recorder::bot::control;
            let req = control::Request { cmd: "record".into(), room, stop };
            let reply = control::request(&control::socket_path(&config), &req).await?;
            match (reply.ok, reply.message, reply.error) {
                (true, Some(m), _) => {
                    println!("{m}");
                    Ok(())
                }
                (_, _, Some(e)) => Err(anyhow::anyhow!("{e}")),
                _ => Err(anyhow::anyhow!("the bot gave an empty answer")),
            }
        }
    }
}

async fn links(command: LinksCommand, config: &Config) -> Result<()> {
    use recorder::http::{links::shareable_objects, HttpState};
    check_http_config(config)?;
    if let LinksCommand::Create { ttl_hours: Some(0), .. } = command {
        anyhow::bail!("--ttl-hours must be at least 1");
    }
    let state = HttpState::open(config).await?;
    let result = match command {
        LinksCommand::Create { recording_id, what, ttl_hours } => {
            let recording = storage::RecordingId::new(recording_id);
            let ttl = ttl_hours
                .map_or(state.links.default_ttl(), |h| std::time::Duration::from_secs(h.saturating_mul(3600)));
            async {
                let objects = shareable_objects(&state.catalog, state.store.as_ref(), &recording, what).await?;
                for o in objects {
                    let link = state.links.issue(&recording, &o.key, ttl).await?;
                    println!("{}: {}  (expires {})", o.label, link.url, link.expires_at.format("%Y-%m-%d %H:%M UTC"));
                }
                anyhow::Ok(())
            }
            .await
        }
        LinksCommand::Revoke { recording_id } => {
            let recording = storage::RecordingId::new(recording_id);
            state.links.revoke_recording(&recording).await.map(|n| println!("revoked: {n}")).map_err(Into::into)
        }
    };
    state.catalog.close().await;
    result
}

/// The settings the HTTP side depends on must be valid; others (the composite's font, say) need
/// not be, since nothing is recorded here.
fn check_http_config(config: &Config) -> Result<()> {
    let problems = config.validate();
    let relevant = |p: &&recorder::config::Problem| ["http", "storage", "catalog"].iter().any(|k| p.key.starts_with(k));
    let list: Vec<String> = problems.iter().filter(relevant).map(ToString::to_string).collect();
    if list.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("invalid configuration:\n  {}", list.join("\n  "))
    }
}

async fn serve(config: &Config) -> Result<()> {
    check_http_config(config)?;
    // With WHIP ingest this process records too: the whole recording environment.
    let (state, env) = if config.whip.enabled {
        let env = std::sync::Arc::new(recorder::pipeline::Env::open(config).await?);
        let signer = storage::store::build_signer(&config.storage)
            .context("preparing URL presigning for the object store")?;
        let mut state =
            recorder::http::HttpState::new(env.catalog.clone(), env.store.clone(), signer, config.http.clone());
        state.whip = recorder::whip::Whip::start(env.clone());
        (state, Some(env))
    } else {
        (recorder::http::HttpState::open(config).await?, None)
    };
    let whip = state.whip.clone();
    let catalog = state.catalog.clone();
    let listener = tokio::net::TcpListener::bind(&config.http.bind)
        .await
        .with_context(|| format!("listening on {} (http.bind)", config.http.bind))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%addr, public_url = %config.http.public_url, "HTTP server listening");
    println!("listening: http://{addr}");
    let served = recorder::http::serve(listener, state, recorder::http::shutdown_signal()).await;
    if let Some(w) = whip {
        w.shutdown(recorder::whip::SHUTDOWN_GRACE).await;
    }
    if let Some(env) = env {
        match std::sync::Arc::try_unwrap(env) {
            Ok(env) => env.shutdown().await,
            Err(_) => tracing::warn!("recordings still hold the environment; pending uploads resume at the next start"),
        }
    }
    catalog.close().await;
    served.with_context(|| format!("serving HTTP on {addr}"))
}
