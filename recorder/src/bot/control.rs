//! The running bot's control socket: `mxrec record --room ID [--stop]` talks to it.
//!
//! A Unix socket at `<data_dir>/mxrec.sock`, mode 0600, so only the account running mxrec can
//! use it; nothing of it is reachable over the network. One JSON line in
//! (`{"cmd": "record", "room": "!id:server", "stop": false}`), one JSON line out
//! (`{"ok": true, "message": "…"}` or `{"ok": false, "error": "…"}`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use matrix_sdk::ruma::RoomId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::rtc::RtcInput;
use crate::config::Config;

/// Longest request line accepted.
const MAX_LINE: usize = 4096;

pub fn socket_path(config: &Config) -> PathBuf {
    config.data_dir.join("mxrec.sock")
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub cmd: String,
    pub room: String,
    #[serde(default)]
    pub stop: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Starts serving the socket; `None` when it cannot be created (logged: the bot runs without it).
pub async fn serve(
    config: &Config,
    rtc: mpsc::Sender<RtcInput>,
    stop: watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let path = socket_path(config);
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    if path.exists() {
        // A live bot answers on it; a stale socket from a crash is replaced.
        if UnixStream::connect(&path).await.is_ok() {
            return Err(anyhow!("another mxrec is running on this data directory ({} answers)", path.display()));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot create the control socket; `mxrec record` will not reach this bot");
            return Ok(None);
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    info!(path = %path.display(), "control socket ready");
    Ok(Some(tokio::spawn(accept(listener, path, rtc, stop))))
}

async fn accept(listener: UnixListener, path: PathBuf, rtc: mpsc::Sender<RtcInput>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, rtc.clone()));
                }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle(stream: UnixStream, rtc: mpsc::Sender<RtcInput>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    let reply = match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
        Ok(Ok(_)) => answer(&line, &rtc).await,
        _ => Reply { ok: false, message: None, error: Some("no request line within 10 s".into()) },
    };
    let mut out = serde_json::to_string(&reply).unwrap_or_default();
    out.push('\n');
    let _ = write.write_all(out.as_bytes()).await;
}

async fn answer(line: &str, rtc: &mpsc::Sender<RtcInput>) -> Reply {
    let fail = |e: String| Reply { ok: false, message: None, error: Some(e) };
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return fail(format!("malformed request: {e}")),
    };
    if req.cmd != "record" {
        return fail(format!("unknown command `{}`", req.cmd));
    }
    let Ok(room) = RoomId::parse(&req.room) else {
        return fail(format!("`{}` is not a room id like !abc:example.org", req.room));
    };
    let (tx, rx) = oneshot::channel();
    if rtc.send(RtcInput::Record { room, stop: req.stop, by: "mxrec record".into(), reply: tx }).await.is_err() {
        return fail("the bot is shutting down".into());
    }
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(Ok(message))) => Reply { ok: true, message: Some(message), error: None },
        Ok(Ok(Err(e))) => fail(e),
        _ => fail("the bot did not answer".into()),
    }
}

/// The client side (`mxrec record`): sends one request, returns the bot's answer.
pub async fn request(socket: &Path, req: &Request) -> Result<Reply> {
    let mut stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("no running mxrec answers on {} (is `mxrec run` running with this configuration?)", socket.display()))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(15), BufReader::new(stream).read_line(&mut reply))
        .await
        .context("the bot did not answer within 15 s")??;
    Ok(serde_json::from_str(reply.trim()).context("the bot's answer is not JSON")?)
}
