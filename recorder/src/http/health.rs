//! `GET /healthz`: 200 `ok` when the catalog answers a trivial query and the object store answers
//! a metadata request; 503 naming the part that does not. The reason itself goes to the log, not
//! to the (possibly public) response.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use storage::Catalog;
use tracing::warn;

use super::HttpState;

/// How long each check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the catalog and the store answer; the failing parts, with why, otherwise.
pub async fn check(catalog: &Catalog, store: &dyn ObjectStore) -> Result<(), Vec<(&'static str, String)>> {
    let catalog_check = async {
        match tokio::time::timeout(CHECK_TIMEOUT, catalog.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        }
    };
    let store_check = async {
        // A HEAD of a key that need not exist: "not found" is an answer, so the store is there,
        // and it costs one cheap request whatever the bucket holds.
        let probe = ObjectPath::from("mxrec-healthz-probe");
        match tokio::time::timeout(CHECK_TIMEOUT, store.head(&probe)).await {
            Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        }
    };
    let (c, s) = tokio::join!(catalog_check, store_check);
    let failed: Vec<_> =
        [("catalog", c), ("store", s)].into_iter().filter_map(|(part, r)| r.err().map(|e| (part, e))).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed)
    }
}

pub(crate) async fn healthz(State(state): State<Arc<HttpState>>) -> Response {
    match check(&state.catalog, state.store.as_ref()).await {
        Ok(()) => (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")], "ok\n").into_response(),
        Err(failed) => {
            let mut body = String::new();
            for (part, why) in &failed {
                warn!(part, error = %why, "health check failed");
                body.push_str(&format!("{part}: unavailable\n"));
            }
            (StatusCode::SERVICE_UNAVAILABLE, [(header::CACHE_CONTROL, "no-store")], body).into_response()
        }
    }
}
