//! Members-only share links against the real loopback Synapse (deploy/dev/synapse.sh): the axum
//! application runs on 127.0.0.1:0 over a SQLite catalog and a local store in a temporary
//! directory; users are registered with the shared secret, and their OpenID tokens, the room and
//! its memberships are real Synapse state. Membership is asked of Synapse by `ClientApiMembership`
//! with the room creator's account (standing in for the bot), or decided by a fixed list in the
//! test to show that the `RoomMembership` answer is what counts.
//!
//! Checked: no proof → 401 page; a member's OpenID token → a grant → the exact bytes (also in
//! ranges); a non-member, an invitee, a forged token, a token for another server, malformed and
//! oversized proofs, bad grants → refused with the reason; leaving the room ends access; expired and
//! revoked members-only links → the same 404 as any link; no membership source → 503; every step
//! in the audit trail with the Matrix user id; the page's own script (run by node when installed)
//! signs in, gets a token, signs out and opens the link.
//!
//! Needs `MXREC_TEST_HOMESERVER`/`MXREC_TEST_SYNAPSE_SECRET` (deploy/dev/synapse.sh env).

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use harness::*;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use recorder::config::HttpConfig;
use recorder::http::{ClientApiMembership, HttpState, Links, RoomMembership};
use serde_json::{json, Value};
use storage::manifest::CallFlavour;
use storage::{Catalog, ObjectKeys, RecordingId, RoomId};

/// A running server over its own catalog and store; stops (gracefully) on `stop`.
struct Server {
    base: String,
    links: Links,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(f: &Fixture, hs: &Synapse, membership: Option<Arc<dyn RoomMembership>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // "example.org" also points at the loopback Synapse, whose users are all @…:localhost:
        // a token presented as example.org's must then be refused.
        let openid_homeservers = BTreeMap::from([
            ("localhost".to_owned(), hs.homeserver.clone()),
            ("example.org".to_owned(), hs.homeserver.clone()),
        ]);
        let config = HttpConfig { public_url: base.clone(), openid_homeservers, ..HttpConfig::default() };
        let mut state = HttpState::new(f.catalog.clone(), f.store.clone(), None, config);
        state.membership = membership;
        let links = state.links.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(recorder::http::serve(listener, state, async {
            let _ = rx.await;
        }));
        Server { base, links, stop: Some(tx), task }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task).await.expect("server stops").unwrap().unwrap();
    }
}

/// A catalog and a local store in a tempdir, with one recording of `room` whose composite is stored.
struct Fixture {
    _dir: tempfile::TempDir,
    catalog: Catalog,
    store: Arc<dyn ObjectStore>,
    recording: RecordingId,
    key: String,
    bytes: Vec<u8>,
}

async fn fixture(room: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("recordings");
    let store = storage::build_store(&toml::from_str(&format!("root = \"{}\"", root.display())).unwrap()).unwrap();
    let catalog = Catalog::connect(&format!("sqlite://{}", dir.path().join("mxrec.db").display())).await.unwrap();
    let room = RoomId::new(room);
    let call = catalog.create_call(&room, CallFlavour::Import, None, storage::now_ms()).await.unwrap();
    let rec = catalog.create_recording(&call.id, storage::now_ms()).await.unwrap();
    let key = ObjectKeys::new(&room, &rec.id).output("call.mp4");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    store.put(&key, PutPayload::from(bytes.clone())).await.unwrap();
    Fixture { _dir: dir, catalog, store, recording: rec.id, key: key.to_string(), bytes }
}

/// A Matrix account logged in on the test Synapse through the plain client-server API.
#[derive(Clone)]
struct Account {
    user_id: String,
    password: String,
    token: String,
}

struct Matrix {
    hs: String,
    http: reqwest::Client,
}

impl Matrix {
    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.hs)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Value {
        let (status, v) = self.call(reqwest::Method::POST, path, token, body).await;
        assert_eq!(status, 200, "POST {path}: {v}");
        v
    }

    async fn account(&self, hs: &Synapse, name: &str) -> Account {
        let password = format!("pw-{name}-{}", unique_suffix());
        let user_id = register_user(hs, name, &password);
        let login = self
            .post(
                "/_matrix/client/v3/login",
                None,
                json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user_id }, "password": password }),
            )
            .await;
        Account { user_id, password, token: login["access_token"].as_str().unwrap().to_owned() }
    }

    /// The answer of `request_token`: `{access_token, matrix_server_name, token_type, expires_in}`.
    async fn openid(&self, a: &Account) -> Value {
        let path = format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&a.user_id));
        let v = self.post(&path, Some(&a.token), json!({})).await;
        assert_eq!(v["matrix_server_name"], "localhost", "{v}");
        v
    }

    async fn devices(&self, a: &Account) -> Vec<String> {
        let (status, v) = self.call(reqwest::Method::GET, "/_matrix/client/v3/devices", Some(&a.token), json!({})).await;
        assert_eq!(status, 200, "{v}");
        v["devices"].as_array().unwrap().iter().map(|d| d["display_name"].as_str().unwrap_or("").to_owned()).collect()
    }
}

fn enc(s: &str) -> String {
    s.replace('@', "%40").replace(':', "%3A").replace('!', "%21")
}

/// Membership as a fixed list says, whatever the room says.
struct FixedMembers(BTreeSet<String>);

#[async_trait]
impl RoomMembership for FixedMembers {
    async fn is_joined(&self, _room_id: &str, user_id: &str) -> anyhow::Result<bool> {
        Ok(self.0.contains(user_id))
    }
}

/// A membership source that cannot answer.
struct Broken;

#[async_trait]
impl RoomMembership for Broken {
    async fn is_joined(&self, room_id: &str, _user_id: &str) -> anyhow::Result<bool> {
        anyhow::bail!("the bot's session for {room_id} is gone")
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// POSTs a proof body to a link; the status and the JSON answer.
async fn prove(link_url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = client()
        .post(format!("{link_url}/openid"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn prove_openid(link_url: &str, openid: &Value) -> (u16, Value) {
    prove(link_url, openid.to_string()).await
}

async fn actions(catalog: &Catalog, rec: &RecordingId) -> Vec<(String, Value)> {
    catalog.audit_events(rec).await.unwrap().into_iter().map(|e| (e.action, e.detail)).collect()
}

fn synapse_or_skip(test: &str) -> Option<Synapse> {
    let hs = synapse();
    if hs.is_none() {
        skip(test, "MXREC_TEST_HOMESERVER / MXREC_TEST_SYNAPSE_SECRET are not set (deploy/dev/synapse.sh env)");
    }
    hs
}

/// The room creator ("bot"), a member, a non-member and an invitee, in a fresh private room.
struct People {
    m: Matrix,
    bot: Account,
    alice: Account,
    mallory: Account,
    ivan: Account,
    room: String,
}

async fn people(hs: &Synapse) -> People {
    let m = Matrix { hs: hs.homeserver.clone(), http: reqwest::Client::new() };
    let s = unique_suffix();
    let bot = m.account(hs, &format!("links-bot-{s}")).await;
    let alice = m.account(hs, &format!("alice-{s}")).await;
    let mallory = m.account(hs, &format!("mallory-{s}")).await;
    let ivan = m.account(hs, &format!("ivan-{s}")).await;
    let created = m
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&bot.token),
            json!({ "preset": "private_chat", "name": "members-only links", "invite": [alice.user_id, ivan.user_id] }),
        )
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    m.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(&alice.token), json!({})).await;
    People { m, bot, alice, mallory, ivan, room }
}

#[tokio::test]
async fn members_only_links_open_for_current_room_members_only() {
    let Some(hs) = synapse_or_skip("members_links::members_only_links_open_for_current_room_members_only") else {
        return;
    };
    let p = people(&hs).await;
    let f = fixture(&p.room).await;
    let membership = ClientApiMembership::new(&hs.homeserver, &p.bot.token).unwrap();
    let server = Server::start(&f, &hs, Some(Arc::new(membership))).await;
    let http = client();

    let link = server.links.issue_members_only(&f.recording, &f.key, Duration::from_secs(3600), &p.room).await.unwrap();
    assert_eq!(link.members_room.as_deref(), Some(p.room.as_str()));
    assert!(server.links.issue_members_only(&f.recording, &f.key, Duration::from_secs(60), "#alias:x").await.is_err());

    // Without proof: the page, 401.
    let r = http.get(&link.url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert!(r.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'sha256-"));
    let page = r.text().await.unwrap();
    assert!(page.contains("for room members") && page.contains("/_matrix/client/v3/login"), "{page}");

    // A member: a grant, then the bytes, whole and in ranges.
    let (status, granted) = prove_openid(&link.url, &p.m.openid(&p.alice).await).await;
    assert_eq!(status, 200, "{granted}");
    assert_eq!(granted["user_id"], p.alice.user_id.as_str());
    let grant = granted["grant"].as_str().unwrap().to_owned();
    let expires = granted["expires_at_ms"].as_i64().unwrap() - storage::now_ms();
    assert!((9 * 60_000..=10 * 60_000).contains(&expires), "{expires}");
    let with_grant = format!("{}?grant={grant}", link.url);
    let r = http.get(&with_grant).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "video/mp4");
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha256_hex(&f.bytes));
    let r = http.get(&with_grant).header("range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &f.bytes[1000..2000]);

    // The grant opens this link only, and only as minted.
    let other = server.links.issue_members_only(&f.recording, &f.key, Duration::from_secs(3600), &p.room).await.unwrap();
    assert_eq!(http.get(format!("{}?grant={grant}", other.url)).send().await.unwrap().status(), 403);
    // One character inside the MAC (the last one also holds padding bits).
    let mut tampered = grant.clone().into_bytes();
    let i = tampered.len() - 5;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    let r = http.get(format!("{}?grant={}", link.url, String::from_utf8(tampered).unwrap())).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("grant is not valid"));
    assert_eq!(http.get(format!("{}?grant=garbage", link.url)).send().await.unwrap().status(), 403);

    // Someone who never was in the room, and someone only invited: not members.
    for (who, acct) in [("mallory", &p.mallory), ("ivan (invited)", &p.ivan)] {
        let (status, v) = prove_openid(&link.url, &p.m.openid(acct).await).await;
        assert_eq!(status, 403, "{who}: {v}");
        assert_eq!(v["reason"], "not_a_member", "{who}: {v}");
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(&acct.user_id) && msg.contains("not a member of the room"), "{msg}");
    }

    // A made-up token, and a real one presented as another server's.
    let (status, v) =
        prove_openid(&link.url, &json!({ "access_token": "forgedTOKENforgedTOKEN", "matrix_server_name": "localhost" })).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["reason"], "openid_token_not_valid");
    assert!(v["error"].as_str().unwrap().contains("not valid at localhost"), "{v}");
    let mut elsewhere = p.m.openid(&p.alice).await;
    elsewhere["matrix_server_name"] = "example.org".into();
    let (status, v) = prove_openid(&link.url, &elsewhere).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["reason"], "user_not_of_that_server");
    assert!(v["error"].as_str().unwrap().contains("not a user of example.org"), "{v}");

    // Malformed and oversized proofs.
    for bad in [
        "not json".to_owned(),
        json!({ "access_token": "abc" }).to_string(),
        json!({ "access_token": "a".repeat(2000), "matrix_server_name": "localhost" }).to_string(),
        json!({ "access_token": "abc", "matrix_server_name": "evil.example/x?y" }).to_string(),
    ] {
        let (status, v) = prove(&link.url, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert_eq!(v["reason"], "malformed", "{v}");
    }
    let (status, _) = prove(&link.url, format!("{{\"access_token\": \"{}\"}}", "a".repeat(20_000))).await;
    assert_eq!(status, 413);

    // Leaving the room ends it: a new proof is refused.
    p.m.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&p.room)), Some(&p.alice.token), json!({})).await;
    let (status, v) = prove_openid(&link.url, &p.m.openid(&p.alice).await).await;
    assert_eq!((status, v["reason"].as_str()), (403, Some("not_a_member")), "{v}");

    // Expired and revoked members-only links are refused like any other link, proof or not.
    let expired = server.links.issue_members_only(&f.recording, &f.key, Duration::ZERO, &p.room).await.unwrap();
    let r = http.get(&expired.url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let gone = r.text().await.unwrap();
    assert!(gone.contains("not valid"), "{gone}");
    let (status, _) = prove_openid(&expired.url, &p.m.openid(&p.bot).await).await;
    assert_eq!(status, 404);
    server.links.revoke_recording(&f.recording).await.unwrap();
    let r = http.get(&with_grant).send().await.unwrap();
    assert_eq!(r.status(), 404, "a grant does not outlive its link");
    assert_eq!(r.text().await.unwrap(), gone);
    let (status, _) = prove_openid(&link.url, &p.m.openid(&p.bot).await).await;
    assert_eq!(status, 404);

    // The audit trail: issued, challenged, granted, fetched and refused, with the Matrix user ids.
    let audit = actions(&f.catalog, &f.recording).await;
    let issued: Vec<_> = audit.iter().filter(|(a, _)| a == "link.issued").collect();
    assert_eq!(issued.len(), 3, "{audit:?}");
    assert!(issued.iter().all(|(_, d)| d["members_room"] == p.room.as_str()), "{issued:?}");
    let granted: Vec<_> = audit.iter().filter(|(a, _)| a == "link.granted").collect();
    assert_eq!(granted.len(), 1, "{audit:?}");
    assert_eq!(granted[0].1["user"], p.alice.user_id.as_str());
    assert_eq!(granted[0].1["link"], link.id.as_str());
    let fetched: Vec<_> = audit
        .iter()
        .filter(|(a, _)| a == "link.fetched")
        .map(|(_, d)| (d["user"].as_str().unwrap().to_owned(), d["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(fetched, [(p.alice.user_id.clone(), 200), (p.alice.user_id.clone(), 206)]);
    let refused: Vec<(String, Option<String>)> = audit
        .iter()
        .filter(|(a, _)| a == "link.refused")
        .map(|(_, d)| (d["reason"].as_str().unwrap().to_owned(), d["user"].as_str().map(str::to_owned)))
        .collect();
    let expect = |reason: &str, user: Option<&str>| {
        assert!(
            refused.iter().any(|(r, u)| r == reason && u.as_deref() == user),
            "no refusal {reason} for {user:?} in {refused:?}"
        );
    };
    expect("proof_required", None);
    expect("grant_not_valid", None);
    expect("grant_malformed", None);
    expect("not_a_member", Some(&p.mallory.user_id));
    expect("not_a_member", Some(&p.ivan.user_id));
    expect("not_a_member", Some(&p.alice.user_id));
    expect("openid_token_not_valid", None);
    expect("user_not_of_that_server", Some(&p.alice.user_id));
    expect("malformed", None);
    expect("expired", None);
    expect("revoked", None);
    // No secret in clear: neither the link token nor any OpenID token.
    let text = format!("{audit:?}");
    assert!(!text.contains(&link.token) && !text.contains("forgedTOKEN"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn the_membership_source_decides_and_its_absence_or_failure_is_a_503() {
    let Some(hs) = synapse_or_skip("members_links::the_membership_source_decides_and_its_absence_or_failure_is_a_503")
    else {
        return;
    };
    let p = people(&hs).await;
    let f = fixture(&p.room).await;
    let http = client();

    // A fixed list that says mallory is in and alice is not: that answer counts.
    let fixed = FixedMembers(BTreeSet::from([p.mallory.user_id.clone()]));
    let server = Server::start(&f, &hs, Some(Arc::new(fixed))).await;
    let link = server.links.issue_members_only(&f.recording, &f.key, Duration::from_secs(600), &p.room).await.unwrap();
    let (status, v) = prove_openid(&link.url, &p.m.openid(&p.mallory).await).await;
    assert_eq!(status, 200, "{v}");
    let r = http.get(format!("{}?grant={}", link.url, v["grant"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha256_hex(&f.bytes));
    let (status, v) = prove_openid(&link.url, &p.m.openid(&p.alice).await).await;
    assert_eq!((status, v["reason"].as_str()), (403, Some("not_a_member")), "{v}");
    // A plain link of the same recording needs no proof at all.
    let plain = server.links.issue(&f.recording, &f.key, Duration::from_secs(600)).await.unwrap();
    assert_eq!(plain.members_room, None);
    assert_eq!(http.get(&plain.url).send().await.unwrap().status(), 200);
    let (status, v) = prove_openid(&plain.url, &p.m.openid(&p.alice).await).await;
    assert_eq!((status, v["reason"].as_str()), (400, Some("not_members_only")), "{v}");
    server.stop().await;

    // A source that fails: 503, the visitor told to try later. (Each server has its own port.)
    let server = Server::start(&f, &hs, Some(Arc::new(Broken))).await;
    let url = format!("{}/r/{}", server.base, link.token);
    let (status, v) = prove_openid(&url, &p.m.openid(&p.alice).await).await;
    assert_eq!((status, v["reason"].as_str()), (503, Some("membership_check_failed")), "{v}");
    server.stop().await;

    // No source at all (`mxrec serve`): 503 with the reason, for the page and for proofs.
    let server = Server::start(&f, &hs, None).await;
    let url = format!("{}/r/{}", server.base, link.token);
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("no Matrix account to check room membership"), "{body}");
    let (status, v) = prove_openid(&url, &p.m.openid(&p.alice).await).await;
    assert_eq!((status, v["reason"].as_str()), (503, Some("membership_unavailable")), "{v}");
    server.stop().await;

    let audit = actions(&f.catalog, &f.recording).await;
    let reasons: Vec<_> = audit
        .iter()
        .filter(|(a, _)| a == "link.refused")
        .map(|(_, d)| d["reason"].as_str().unwrap().to_owned())
        .collect();
    for r in ["not_a_member", "membership_check_failed", "membership_unavailable"] {
        assert!(reasons.iter().any(|x| x == r), "{r} not in {reasons:?}");
    }
    assert!(
        audit.iter().any(|(a, d)| a == "link.fetched" && d["user"] == p.mallory.user_id.as_str()),
        "{audit:?}"
    );
}

/// The script of the page as served, run by node (when installed): sign in at Synapse, get an
/// OpenID token, sign out, redeem it at mxrec; the URL it would open serves the file.
#[tokio::test]
async fn the_pages_own_script_signs_in_proves_and_signs_out() {
    let Some(hs) = synapse_or_skip("members_links::the_pages_own_script_signs_in_proves_and_signs_out") else {
        return;
    };
    if std::process::Command::new("node").arg("--version").output().is_err() {
        // `make test` installs node (deploy/dev/install-deps.sh --test): there its absence fails.
        assert!(
            std::env::var_os("MXREC_REQUIRE_TEST_SERVERS").is_none(),
            "node is not installed (deploy/dev/install-deps.sh --test installs it)"
        );
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "!!! SKIPPED the_pages_own_script_signs_in_proves_and_signs_out: no `node`");
        return;
    }
    let p = people(&hs).await;
    let f = fixture(&p.room).await;
    let membership = ClientApiMembership::new(&hs.homeserver, &p.bot.token).unwrap();
    let server = Server::start(&f, &hs, Some(Arc::new(membership))).await;
    let link = server.links.issue_members_only(&f.recording, &f.key, Duration::from_secs(600), &p.room).await.unwrap();
    let page = client().get(&link.url).send().await.unwrap().text().await.unwrap();
    let script = page.split_once("<script>").unwrap().1.split_once("</script>").unwrap().0;
    let dir = tempfile::tempdir().unwrap();
    let js = dir.path().join("page.js");
    std::fs::write(
        &js,
        format!(
            "{script}\n(async () => {{\n\
               const o = await openIdFromLogin(process.env.HS, process.env.U, process.env.P);\n\
               console.log(JSON.stringify(await redeem(o, new URL(process.env.LINK))));\n\
             }})().catch((e) => {{ console.log(JSON.stringify({{ error: e.message }})); }});\n"
        ),
    )
    .unwrap();
    // The server runs on this test's runtime: node is waited for with tokio, not blocking it.
    let run = async |acct: &Account, password: &str| {
        let out = tokio::process::Command::new("node")
            .arg(&js)
            .env("HS", &hs.homeserver)
            .env("U", &acct.user_id)
            .env("P", password)
            .env("LINK", &link.url)
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "node: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    };

    let before = p.m.devices(&p.alice).await.len();
    let opened = run(&p.alice, &p.alice.password).await;
    assert_eq!(opened["user_id"], p.alice.user_id.as_str(), "{opened}");
    let url = opened["url"].as_str().unwrap();
    assert!(url.starts_with(&format!("{}?grant=", link.url)), "{url}");
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha256_hex(&f.bytes));
    assert_eq!(p.m.devices(&p.alice).await.len(), before, "the page's session was signed out again");

    let refused = run(&p.mallory, &p.mallory.password).await;
    let msg = refused["error"].as_str().unwrap_or_else(|| panic!("{refused}"));
    assert!(msg.contains("refused") && msg.contains("not a member of the room"), "{msg}");
    let wrong = run(&p.alice, "wrong password").await;
    let msg = wrong["error"].as_str().unwrap_or_else(|| panic!("{wrong}"));
    assert!(msg.starts_with("signing in at "), "{msg}");
    server.stop().await;
}
