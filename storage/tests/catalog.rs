//! The catalog on real databases: SQLite in a temp file always, Postgres when
//! MXREC_TEST_POSTGRES_URL points at one (deploy/dev/postgres.sh). The same scenario runs on both.

mod common;

use sqlx::{AssertSqlSafe, Connection};
use storage::catalog::{LinkRecord, Segment, Track, Upload, UploadState};
use storage::manifest::{CallFlavour, TrackKind, TrackSource};
use storage::{Catalog, Error, RecordingState};

/// Share links of both kinds keep what they are: the members-only room round-trips, plain links
/// have none.
async fn links_scenario(catalog: &Catalog) {
    let call = catalog
        .create_call(&"!links:example.org".into(), CallFlavour::Import, None, 1_000)
        .await
        .unwrap();
    let rec = catalog.create_recording(&call.id, 1_000).await.unwrap();
    let plain = LinkRecord {
        token_hash: "aa".repeat(32),
        recording_id: rec.id.clone(),
        object_key: "rooms/x/call.mp4".into(),
        created_at_ms: 1_000,
        expires_at_ms: Some(i64::MAX),
        revoked_at_ms: None,
        members_room: None,
    };
    let members = LinkRecord {
        token_hash: "bb".repeat(32),
        members_room: Some("!links:example.org".into()),
        ..plain.clone()
    };
    catalog.insert_link(&plain).await.unwrap();
    catalog.insert_link(&members).await.unwrap();
    assert_eq!(
        catalog.links_of_recording(&rec.id).await.unwrap(),
        vec![plain.clone(), members.clone()]
    );
    assert_eq!(
        catalog.link_by_token_hash(&members.token_hash).await.unwrap(),
        Some(members)
    );
}

async fn scenario(catalog: &Catalog) {
    let room = storage::RoomId::new("!room:example.org");
    let stored = catalog.upsert_room(&room, Some("Standup")).await.unwrap();
    assert_eq!(stored.name.as_deref(), Some("Standup"));
    // A later upsert without a name keeps the known one.
    assert_eq!(
        catalog
            .upsert_room(&room, None)
            .await
            .unwrap()
            .name
            .as_deref(),
        Some("Standup")
    );
    assert!(catalog.get_room(&"!nope:x".into()).await.unwrap().is_none());

    let call = catalog
        .create_call(&room, CallFlavour::Matrixrtc, Some("m.call#1"), 1_000)
        .await
        .unwrap();
    assert_eq!(catalog.get_call(&call.id).await.unwrap().unwrap(), call);
    catalog.end_call(&call.id, 9_000).await.unwrap();
    assert_eq!(
        catalog
            .get_call(&call.id)
            .await
            .unwrap()
            .unwrap()
            .ended_at_ms,
        Some(9_000)
    );

    let rec = catalog.create_recording(&call.id, 1_500).await.unwrap();
    assert_eq!(rec.state, RecordingState::Recording);
    assert_eq!(rec.room_id, room);
    let older = catalog.create_recording(&call.id, 1_200).await.unwrap();

    // Participants: a rejoin is a second stint.
    let alice = storage::UserId::new("@alice:example.org");
    let p1 = catalog
        .add_participant(&rec.id, "alice|DEV", &alice, Some(&"DEV".into()), Some("Alice"), 1_500)
        .await
        .unwrap();
    catalog.participant_left(&p1.id, 3_000).await.unwrap();
    let p2 = catalog
        .add_participant(&rec.id, "alice", &alice, None, None, 4_000)
        .await
        .unwrap();
    let ps = catalog.participants(&rec.id).await.unwrap();
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[0].left_at_ms, Some(3_000));
    assert_eq!(ps[0].key.as_deref(), Some("alice|DEV"), "the adapter's key comes back");
    assert_eq!(ps[1].id, p2.id);
    assert_eq!(ps[1].device_id, None);

    let track = Track {
        recording_id: rec.id.clone(),
        id: "t-audio".into(),
        participant_id: p1.id.clone(),
        kind: TrackKind::Audio,
        codec: "opus".into(),
        source: TrackSource::Microphone,
    };
    catalog.add_track(&track).await.unwrap();
    assert_eq!(catalog.tracks(&rec.id).await.unwrap(), vec![track.clone()]);

    for i in (0..3).rev() {
        let s = Segment {
            recording_id: rec.id.clone(),
            track_id: track.id.clone(),
            index: i,
            start_us: i64::from(i) * 2_000_000,
            end_us: i64::from(i + 1) * 2_000_000,
            bytes: 5_000_000_000 + u64::from(i), // > 4 GiB: must survive as BIGINT
            sha256: "ab".repeat(32),
            object_key: format!("k/{i}"),
        };
        catalog.add_segment(&s).await.unwrap();
        catalog.add_segment(&s).await.unwrap(); // idempotent
    }
    let segs = catalog.segments(&rec.id, &track.id).await.unwrap();
    assert_eq!(segs.iter().map(|s| s.index).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(segs[2].bytes, 5_000_000_002);

    // A segment for a track that does not exist violates the foreign key on both databases.
    let orphan = Segment {
        track_id: "ghost".into(),
        ..segs[0].clone()
    };
    assert!(matches!(
        catalog.add_segment(&orphan).await,
        Err(Error::Database(_))
    ));

    let mut up = Upload {
        object_key: "k/0".into(),
        recording_id: Some(rec.id.clone()),
        local_path: "/spool/0".into(),
        size: None,
        sha256: None,
        etag: None,
        state: UploadState::Pending,
        attempts: 0,
        last_error: None,
    };
    catalog.record_upload(&up).await.unwrap();
    assert!(catalog
        .uploads_in_state(UploadState::Pending)
        .await
        .unwrap()
        .contains(&up));
    up.state = UploadState::Verified;
    up.attempts = 2;
    up.size = Some(123);
    up.etag = Some("abc-2".into());
    up.last_error = Some("timeout".into());
    catalog.record_upload(&up).await.unwrap();
    assert!(!catalog
        .uploads_in_state(UploadState::Pending)
        .await
        .unwrap()
        .iter()
        .any(|u| u.object_key == "k/0"));
    assert!(catalog
        .uploads_in_state(UploadState::Verified)
        .await
        .unwrap()
        .contains(&up));

    // State machine, enforced by the catalog.
    let unfinished = catalog.unfinished_recordings().await.unwrap();
    assert!(
        unfinished.iter().any(|r| r.id == rec.id) && unfinished.iter().any(|r| r.id == older.id)
    );
    let err = catalog
        .set_recording_state(&rec.id, RecordingState::Published, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidTransition {
                from: RecordingState::Recording,
                ..
            }
        ),
        "{err}"
    );
    let r = catalog
        .set_recording_state(&rec.id, RecordingState::Finalizing, Some("call ended"))
        .await
        .unwrap();
    assert_eq!(
        (r.state, r.state_reason.as_deref()),
        (RecordingState::Finalizing, Some("call ended"))
    );
    // Idempotent: finalize again after a restart.
    catalog
        .set_recording_state(&rec.id, RecordingState::Finalizing, None)
        .await
        .unwrap();
    catalog.set_recording_ended(&rec.id, 9_000).await.unwrap();
    catalog
        .set_manifest_key(&rec.id, "k/manifest.json")
        .await
        .unwrap();
    catalog
        .set_recording_state(&rec.id, RecordingState::Uploaded, None)
        .await
        .unwrap();
    assert!(!catalog
        .unfinished_recordings()
        .await
        .unwrap()
        .iter()
        .any(|r| r.id == rec.id));
    let r = catalog
        .set_recording_state(&rec.id, RecordingState::Published, None)
        .await
        .unwrap();
    assert_eq!(r.manifest_key.as_deref(), Some("k/manifest.json"));
    assert_eq!(r.ended_at_ms, Some(9_000));
    assert!(catalog
        .set_recording_state(&rec.id, RecordingState::Failed, Some("late"))
        .await
        .is_err());

    let failed = catalog
        .set_recording_state(&older.id, RecordingState::Failed, Some("disk full"))
        .await
        .unwrap();
    assert_eq!(failed.state_reason.as_deref(), Some("disk full"));

    let recent = catalog.recent_recordings(&room, 10).await.unwrap();
    assert_eq!(
        recent.iter().map(|r| &r.id).collect::<Vec<_>>(),
        [&rec.id, &older.id],
        "newest first"
    );
    assert_eq!(catalog.recent_recordings(&room, 1).await.unwrap().len(), 1);
    let everywhere = catalog.all_recent_recordings(10).await.unwrap();
    assert!(everywhere.iter().any(|r| r.id == rec.id) && everywhere.iter().any(|r| r.id == older.id));
    assert_eq!(catalog.all_recent_recordings(1).await.unwrap().len(), 1);

    catalog
        .audit(
            "@admin:example.org",
            "recording.stop",
            Some(&rec.id),
            serde_json::json!({"via": "!rec stop"}),
        )
        .await
        .unwrap();
    let events = catalog.audit_events(&rec.id).await.unwrap();
    let actions: Vec<_> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions.first(), Some(&"recording.created"));
    assert_eq!(
        actions.iter().filter(|a| **a == "recording.state").count(),
        3
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last.actor.as_str(), &last.detail),
        (
            "@admin:example.org",
            &serde_json::json!({"via": "!rec stop"})
        )
    );

    assert!(matches!(
        catalog
            .set_recording_state(&"missing".into(), RecordingState::Failed, None)
            .await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn catalog_on_sqlite() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/nested/mxrec.db", dir.path().display());
    let catalog = Catalog::connect(&url).await.unwrap();
    scenario(&catalog).await;
    links_scenario(&catalog).await;
    catalog.close().await;
    // Reopening runs the (already applied) migrations again and sees the same data.
    let again = Catalog::connect(&url).await.unwrap();
    assert_eq!(
        again
            .recent_recordings(&"!room:example.org".into(), 10)
            .await
            .unwrap()
            .len(),
        2
    );
    let journal: String = {
        let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    assert_eq!(journal, "wal");
}

#[tokio::test]
async fn catalog_on_postgres() {
    common::init_tracing();
    let Some(base) = common::env("MXREC_TEST_POSTGRES_URL") else {
        common::skip("catalog_on_postgres", "MXREC_TEST_POSTGRES_URL");
        return;
    };
    // A fresh database per run, so leftovers of earlier runs cannot mask anything.
    let name = format!("mxrec_t_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to MXREC_TEST_POSTGRES_URL");
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    let url = format!("{prefix}/{name}");

    let catalog = Catalog::connect(&url).await.unwrap();
    scenario(&catalog).await;
    links_scenario(&catalog).await;
    catalog.close().await;
    let again = Catalog::connect(&url).await.unwrap();
    assert_eq!(
        again
            .recent_recordings(&"!room:example.org".into(), 10)
            .await
            .unwrap()
            .len(),
        2
    );
    again.close().await;

    sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// A catalog made before members-only links existed (only the first migration applied, one link
/// in it) is migrated on connect, and its link stays a plain one.
#[tokio::test]
async fn links_of_an_older_catalog_stay_plain_after_the_upgrade() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("migrations");
    std::fs::create_dir(&first).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut names: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    std::fs::copy(src.join(&names[0]), first.join(&names[0])).unwrap();

    let url = format!("sqlite://{}?mode=rwc", dir.path().join("old.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::migrate::Migrator::new(first.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO rooms VALUES ('!old:x', NULL, 1, 1); \
         INSERT INTO calls VALUES ('c', '!old:x', NULL, 'import', 1, NULL); \
         INSERT INTO recordings VALUES ('r', '!old:x', 'c', 'published', NULL, 1, 2, NULL, 1, 2); \
         INSERT INTO links VALUES ('cc', 'r', 'k/call.mp4', 1, 99, NULL);",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let catalog = Catalog::connect(&url).await.unwrap();
    let link = catalog.link_by_token_hash("cc").await.unwrap().unwrap();
    assert_eq!(link.members_room, None);
    assert_eq!(link.expires_at_ms, Some(99));
    catalog.close().await;
}
