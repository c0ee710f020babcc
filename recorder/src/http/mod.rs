//! The HTTP side of mxrec: one axum server over the catalog and the object store.
//!
//! - `GET /r/<token>` — a recording's file through a share link ([`links`] issues them,
//!   [`download`] serves them: a stream with ranges, or a redirect to a presigned store URL).
//!   A members-only link first wants proof of room membership: `POST /r/<token>/openid` with a
//!   Matrix OpenID token ([`members`], [`openid`]).
//! - `GET /healthz` — whether the catalog and the store answer ([`health`]).
//! - `GET /metrics` — Prometheus text of everything mxrec emits ([`metrics`]).
//! - `/whip/…` — WHIP ingest ([`crate::whip`]), when `whip.enabled`.
//!
//! [`router`] is the whole application over one shared [`HttpState`]; [`serve`] runs it on a
//! listener until a shutdown future resolves, then lets open downloads finish for a bounded grace.
//! Tests start the real thing on `127.0.0.1:0`.

pub mod download;
pub mod health;
pub mod links;
pub mod members;
pub mod metrics;
pub mod openid;
pub mod range;

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use object_store::signer::Signer;
use object_store::ObjectStore;
use storage::Catalog;
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tracing::{info, warn};

use crate::config::{Config, HttpConfig};
pub use links::{Link, LinkError, Links, Lookup, What};
pub use members::{ClientApiMembership, RoomMembership};
pub use metrics::install_metrics_recorder;

/// What every request handler shares.
pub struct HttpState {
    pub catalog: Catalog,
    pub store: Arc<dyn ObjectStore>,
    /// Present for stores that can presign URLs: downloads are redirected there.
    pub signer: Option<Arc<dyn Signer>>,
    pub config: HttpConfig,
    pub links: Links,
    /// Who is in a room, for members-only links: the bot's Matrix session under `mxrec run`.
    /// `None` (what [`HttpState::new`] sets) makes every members-only link answer 503.
    pub membership: Option<Arc<dyn RoomMembership>>,
    pub(crate) openid: openid::OpenIdVerifier,
    pub(crate) grants: members::Grants,
    /// WHIP ingest, when `whip.enabled` (its routes are mounted only then).
    pub whip: Option<Arc<crate::whip::Whip>>,
    metrics: PrometheusHandle,
}

impl HttpState {
    /// Installs the metrics recorder if this is the first server of the process.
    pub fn new(
        catalog: Catalog,
        store: Arc<dyn ObjectStore>,
        signer: Option<Arc<dyn Signer>>,
        config: HttpConfig,
    ) -> Self {
        let links = Links::new(catalog.clone(), &config);
        Self {
            catalog,
            store,
            signer,
            openid: openid::OpenIdVerifier::new(&config),
            config,
            links,
            membership: None,
            grants: members::Grants::new(),
            whip: None,
            metrics: install_metrics_recorder(),
        }
    }

    /// Builds the store and its presigner from the configuration and opens the catalog.
    pub async fn open(config: &Config) -> Result<Self> {
        let store = storage::build_store(&config.storage).context("opening the object store")?;
        let signer =
            storage::store::build_signer(&config.storage).context("preparing URL presigning for the object store")?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
        let catalog = Catalog::connect(&config.catalog_url()).await.context("opening the catalog")?;
        Ok(Self::new(catalog, store, signer, config.http.clone()))
    }
}

/// The application: every route, a body limit and a time limit on producing response headers.
pub fn router(state: Arc<HttpState>) -> Router {
    let timeout = Duration::from_secs(state.config.request_timeout_secs);
    let body_limit = state.config.max_body_bytes;
    let whip = state.whip.as_ref().map(|w| w.routes()).unwrap_or_default();
    Router::new()
        .route("/r/{token}", get(download::serve_link))
        .route("/r/{token}/openid", post(members::prove))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(metrics::render))
        .layer(DefaultBodyLimit::max(body_limit))
        .merge(whip)
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting and gives open connections
/// `http.shutdown_grace_secs` to finish before returning anyway.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = Duration::from_secs(state.config.shutdown_grace_secs);
    let app = router(Arc::new(state));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        info!("HTTP server shutting down; no new connections");
        let _ = stop_tx.send(true);
    });
    let deadline = async move {
        let _ = stop_rx.wait_for(|stopped| *stopped).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server.into_future() => r,
        () = deadline => {
            warn!(grace_secs = grace.as_secs(), "connections still open after the shutdown grace; closing them");
            Ok(())
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
