//! The bot's own presence in a MatrixRTC call, on the Matrix side: its membership state event
//! (the legacy `org.matrix.msc3401.call.member` form Element Call writes in its default
//! `compatibility` mode, which every current client reads), kept alive by an MSC4140 delayed
//! leave that the bot restarts while it records, so the homeserver withdraws the membership by
//! itself if mxrec dies; and the Matrix OpenID token a JWT service wants.
//!
//! matrix-sdk 0.18 has no delayed-event API, so those requests go to the client-server API
//! directly with the bot's access token.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use matrix_sdk::ruma::api::client::account::request_openid_token;
use matrix_sdk::ruma::OwnedRoomId;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::matrixrtc::access::OpenIdToken;
use crate::matrixrtc::session;

use super::super::BotContext;

/// Percent-encodes one path segment (room ids and state keys carry `!`, `:`, `@`).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The bot's membership in one room's call.
pub struct OwnMembership {
    room_id: OwnedRoomId,
    state_key: String,
    delay_id: Option<String>,
    http: reqwest::Client,
}

impl OwnMembership {
    fn base(ctx: &BotContext) -> String {
        ctx.client.homeserver().as_str().trim_end_matches('/').to_owned()
    }

    fn token(ctx: &BotContext) -> Result<String> {
        ctx.client.access_token().ok_or_else(|| anyhow!("the bot has no access token"))
    }

    /// Schedules the delayed leave (when the homeserver offers MSC4140), then publishes the
    /// membership itself with `service_url` as the bot's focus.
    pub async fn publish(ctx: &BotContext, room_id: &OwnedRoomId, service_url: &str) -> Result<OwnMembership> {
        let cfg = &ctx.config.matrixrtc;
        let (state_key, content) = session::own_legacy_membership(
            ctx.user_id.as_str(),
            ctx.device_id.as_str(),
            service_url,
            room_id.as_str(),
            None,
            cfg.membership_expires_ms,
        );
        let http = reqwest::Client::new();
        let url = format!(
            "{}/_matrix/client/v3/rooms/{}/state/{}/{}",
            Self::base(ctx),
            segment(room_id.as_str()),
            segment(session::LEGACY_MEMBER_EVENT_TYPE),
            segment(&state_key)
        );
        let token = Self::token(ctx)?;
        // The leave first: if the membership lands and mxrec dies, the leave still comes.
        let delay_id = match http
            .put(format!("{url}?org.matrix.msc4140.delay={}", cfg.delayed_leave_ms))
            .bearer_auth(&token)
            .json(&serde_json::json!({}))
            .timeout(Duration::from_secs(15))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.unwrap_or_default();
                v["delay_id"].as_str().map(str::to_owned)
            }
            Ok(r) => {
                info!(status = %r.status(), "the homeserver offers no delayed events (MSC4140); the membership expires by its `expires` only");
                None
            }
            Err(e) => {
                warn!(error = %e, "scheduling the delayed leave failed; the membership expires by its `expires` only");
                None
            }
        };
        let resp = http
            .put(&url)
            .bearer_auth(&token)
            .json(&content)
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .context("publishing the bot's call membership")?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(anyhow!("publishing the bot's call membership: HTTP {status}: {}", body.chars().take(300).collect::<String>()));
        }
        info!(%state_key, delayed_leave = delay_id.is_some(), "call membership published");
        Ok(OwnMembership { room_id: room_id.clone(), state_key, delay_id, http })
    }

    /// How often [`keep_alive`](Self::keep_alive) must run.
    pub fn refresh_interval(ctx: &BotContext) -> Duration {
        Duration::from_millis(ctx.config.matrixrtc.delayed_leave_ms / 3)
    }

    /// Restarts the delayed leave's timer.
    pub async fn keep_alive(&self, ctx: &BotContext) {
        let Some(id) = &self.delay_id else { return };
        let Ok(token) = Self::token(ctx) else { return };
        let base = Self::base(ctx);
        // The MSC's first form (`{"action": …}`), then the current one (`/restart`).
        let r = self
            .http
            .post(format!("{base}/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{}", segment(id)))
            .bearer_auth(&token)
            .json(&serde_json::json!({"action": "restart"}))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => debug!("delayed leave restarted"),
            Ok(r) => {
                let alt = self
                    .http
                    .post(format!("{base}/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{}/restart", segment(id)))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({}))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                if !alt.as_ref().is_ok_and(|a| a.status().is_success()) {
                    warn!(status = %r.status(), "restarting the delayed leave failed");
                }
            }
            Err(e) => warn!(error = %e, "restarting the delayed leave failed"),
        }
    }

    /// Withdraws the membership now (sends the leave; the delayed one is sent at once or
    /// cancelled).
    pub async fn leave(self, ctx: &BotContext) {
        let Ok(token) = Self::token(ctx) else { return };
        let base = Self::base(ctx);
        if let Some(id) = &self.delay_id {
            let sent = self
                .http
                .post(format!("{base}/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{}", segment(id)))
                .bearer_auth(&token)
                .json(&serde_json::json!({"action": "send"}))
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            if sent.as_ref().is_ok_and(|r| r.status().is_success()) {
                info!("call membership withdrawn (delayed leave sent)");
                return;
            }
        }
        let url = format!(
            "{base}/_matrix/client/v3/rooms/{}/state/{}/{}",
            segment(self.room_id.as_str()),
            segment(session::LEGACY_MEMBER_EVENT_TYPE),
            segment(&self.state_key)
        );
        match self.http.put(&url).bearer_auth(&token).json(&serde_json::json!({})).timeout(Duration::from_secs(15)).send().await {
            Ok(r) if r.status().is_success() => info!("call membership withdrawn"),
            Ok(r) => warn!(status = %r.status(), "withdrawing the call membership failed; it expires by itself"),
            Err(e) => warn!(error = %e, "withdrawing the call membership failed; it expires by itself"),
        }
    }
}

/// A Matrix OpenID token for the bot (what a JWT service checks).
pub async fn openid_token(ctx: &BotContext) -> Result<OpenIdToken> {
    let resp = ctx
        .client
        .send(request_openid_token::v3::Request::new(ctx.user_id.clone()))
        .await
        .context("requesting a Matrix OpenID token")?;
    Ok(OpenIdToken {
        access_token: resp.access_token,
        token_type: resp.token_type.to_string(),
        matrix_server_name: resp.matrix_server_name.to_string(),
        expires_in: resp.expires_in.as_secs(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(super::segment("!a:b.c"), "%21a%3Ab.c");
        assert_eq!(super::segment("_@u:hs_DEV_m.call"), "_%40u%3Ahs_DEV_m.call");
    }
}
