//! The bot's Matrix client: one device, kept across restarts.
//!
//! The state, crypto and event-cache stores are SQLite files under `matrix.store_dir` (default
//! `<data_dir>/matrix`), optionally encrypted with `matrix.store_passphrase`; the session (user,
//! device id, access token) is saved beside them in `session.json` (mode 0600). A restart restores
//! that session, so the device and its Olm identity stay the same and rooms keep sharing keys
//! with it. The crypto store belongs to one device: if the saved token stops working (the device
//! was logged out or deleted), its stores are moved aside and the bot logs in as a new device.
//!
//! With a password the bot also bootstraps cross-signing for its account (once), so clients that
//! only share room keys with cross-signed devices include it.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::encryption::EncryptionSettings;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId};
use matrix_sdk::{Client, SessionMeta, SessionTokens};
use tracing::{info, warn};

use crate::config::{Config, MatrixConfig};

/// A logged-in client and who it is.
pub struct Session {
    pub client: Client,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
}

/// Builds the client on the stores under the data dir, restores or creates the session, and sets
/// up cross-signing when a password allows it.
pub async fn connect(config: &Config) -> Result<Session> {
    let m = &config.matrix;
    let homeserver = m.homeserver.as_deref().ok_or_else(|| anyhow!("matrix.homeserver is not set"))?;
    let store_dir = config.matrix_store_dir();
    let session_file = store_dir.join("session.json");
    let mut client = open_client(homeserver, &store_dir, m).await?;
    match read_session(&session_file)? {
        Some(session) => {
            if let Restored::Revoked = restore(&client, m, session, &session_file).await? {
                // The device is gone on the server (its token was revoked, by a logout or an
                // admin): its crypto store cannot be used by another device, so it is kept aside
                // and the bot logs in as a new device with fresh stores.
                drop(client);
                let aside = store_dir.with_extension(format!("revoked-{}", storage::now_ms()));
                std::fs::rename(&store_dir, &aside)
                    .with_context(|| format!("moving the revoked device's stores to {}", aside.display()))?;
                warn!(kept = %aside.display(), "the saved device was revoked; logging in as a new device");
                client = open_client(homeserver, &store_dir, m).await?;
                first_login(&client, m, &session_file).await?;
            }
        }
        None => first_login(&client, m, &session_file).await?,
    }
    let meta = client.session_meta().ok_or_else(|| anyhow!("no session after login"))?.clone();
    client.encryption().wait_for_e2ee_initialization_tasks().await;
    if let Some(password) = &m.password {
        if let Err(e) = bootstrap_cross_signing(&client, &meta.user_id, password).await {
            warn!(error = %format!("{e:#}"), "cross-signing could not be set up; clients that only trust verified devices may not share keys with the bot");
        }
    } else {
        info!("no password configured: cross-signing is not set up by mxrec");
    }
    Ok(Session { client, user_id: meta.user_id, device_id: meta.device_id })
}

async fn open_client(homeserver: &str, store_dir: &Path, m: &MatrixConfig) -> Result<Client> {
    std::fs::create_dir_all(store_dir).with_context(|| format!("creating {}", store_dir.display()))?;
    Client::builder()
        .homeserver_url(homeserver)
        .sqlite_store(store_dir, m.store_passphrase.as_deref())
        .with_encryption_settings(EncryptionSettings::default())
        .build()
        .await
        .with_context(|| format!("opening the Matrix stores in {}", store_dir.display()))
}

enum Restored {
    Ok,
    /// The homeserver no longer accepts the saved token.
    Revoked,
}

fn read_session(path: &Path) -> Result<Option<MatrixSession>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a saved session; move it away to log in afresh", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save_session(client: &Client, path: &Path) -> Result<()> {
    let session = client.matrix_auth().session().ok_or_else(|| anyhow!("logged in without a session"))?;
    let json = serde_json::to_vec_pretty(&session)?;
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("saving {}", path.display()))?;
    Ok(())
}

async fn first_login(client: &Client, m: &MatrixConfig, session_file: &Path) -> Result<()> {
    let user = m.user.as_deref().ok_or_else(|| anyhow!("matrix.user is not set"))?;
    if let Some(token) = &m.access_token {
        let device_id = m.device_id.as_deref().ok_or_else(|| anyhow!("matrix.device_id is needed with an access_token"))?;
        let user_id: OwnedUserId = user
            .try_into()
            .map_err(|_| anyhow!("matrix.user must be a full user id (@name:server) with an access_token"))?;
        let session = MatrixSession {
            meta: SessionMeta { user_id, device_id: device_id.into() },
            tokens: SessionTokens { access_token: token.clone(), refresh_token: None },
        };
        client.restore_session(session).await.context("using matrix.access_token")?;
        client.whoami().await.context("the homeserver refused matrix.access_token")?;
    } else {
        let password = m.password.as_deref().ok_or_else(|| anyhow!("matrix.password is not set"))?;
        let mut login = client.matrix_auth().login_username(user, password).initial_device_display_name(&m.device_name);
        if let Some(d) = &m.device_id {
            login = login.device_id(d);
        }
        let resp = login.send().await.with_context(|| format!("logging in as {user}"))?;
        info!(user = %resp.user_id, device = %resp.device_id, "logged in; new session saved");
    }
    save_session(client, session_file)
}

async fn restore(client: &Client, m: &MatrixConfig, session: MatrixSession, session_file: &Path) -> Result<Restored> {
    let device = session.meta.device_id.clone();
    let user = session.meta.user_id.clone();
    if let Some(configured) = m.user.as_deref() {
        let same = configured == user.as_str() || configured == user.localpart();
        if !same {
            bail!(
                "the saved session in {} belongs to {user}, but matrix.user is {configured}; \
                 use another matrix.store_dir for another account",
                session_file.display()
            );
        }
    }
    client.restore_session(session).await.context("restoring the saved Matrix session")?;
    match client.whoami().await {
        Ok(_) => {
            info!(%user, %device, "restored the saved session");
            Ok(Restored::Ok)
        }
        Err(e) if is_unknown_token(&e) => {
            if m.password.is_none() {
                bail!(
                    "the saved access token of {user} (device {device}) was revoked; configure a new \
                     matrix.access_token and matrix.device_id, and move {} away",
                    session_file.parent().unwrap_or(session_file).display()
                );
            }
            Ok(Restored::Revoked)
        }
        Err(e) => Err(e).context("checking the saved session with the homeserver"),
    }
}

fn is_unknown_token(e: &matrix_sdk::HttpError) -> bool {
    e.client_api_error_kind()
        .is_some_and(|k| matches!(k, matrix_sdk::ruma::api::error::ErrorKind::UnknownToken { .. }))
}

async fn bootstrap_cross_signing(client: &Client, user_id: &OwnedUserId, password: &str) -> Result<()> {
    let enc = client.encryption();
    if enc.cross_signing_status().await.is_some_and(|s| s.is_complete()) {
        return Ok(());
    }
    match enc.bootstrap_cross_signing_if_needed(None).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let Some(uiaa_info) = e.as_uiaa_response() else {
                return Err(e).context("bootstrapping cross-signing");
            };
            let mut pw = uiaa::Password::new(
                uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(user_id.localpart().to_owned())),
                password.to_owned(),
            );
            pw.session = uiaa_info.session.clone();
            enc.bootstrap_cross_signing(Some(uiaa::AuthData::Password(pw)))
                .await
                .context("bootstrapping cross-signing with the password")?;
            info!("cross-signing set up for the bot's account");
            Ok(())
        }
    }
}
