//! A recording manifest as `mxrec export` and the share links read it from the bucket:
//! `Manifest::from_json` (strict parse and cross-checks), then the composite plan and filter
//! graph that `mxrec export` builds from it.
//!
//! Input: the manifest JSON, raw.
//!
//! Checks: an accepted manifest validates, serialises, and parses back to an equal manifest
//! (pretty and compact); the composite spec and the filter graph are built without panicking,
//! and nothing from the manifest (display names) adds output labels to the graph.

#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use recorder::config::CompositeConfig;
use storage::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::from_json(data) else { return };
    m.validate().expect("an accepted manifest validates");
    let pretty = m.to_json_pretty().expect("an accepted manifest serialises");
    let back = Manifest::from_json(pretty.as_bytes()).unwrap_or_else(|e| panic!("own output refused: {e}\n{pretty}"));
    assert_eq!(back, m, "manifest changed across serialise and parse");
    let compact = serde_json::to_vec(&m).expect("serialises");
    assert_eq!(Manifest::from_json(&compact).expect("compact output parses"), m);

    // Segment files that do not exist: the plan then knows nothing of their coverage, as for
    // segments that failed to download, and no media is read.
    let files: BTreeMap<String, PathBuf> = m
        .tracks
        .iter()
        .flat_map(|t| &t.segments)
        .enumerate()
        .map(|(i, s)| (s.key.clone(), PathBuf::from(format!("/nonexistent/mxrec-fuzz/{i}.mkv"))))
        .collect();
    let Ok(spec) = recorder::export::composite_spec(&m, &files, &CompositeConfig::default()) else { return };
    let graph = transcoder::filtergraph(&spec);
    // Display names and the like are escaped into the graph: with escaped characters left out,
    // the output labels appear exactly once, whatever the names say.
    let structure = unescaped(&graph);
    assert_eq!(structure.matches("[aout]").count(), 1, "audio output label in {graph}");
    assert_eq!(structure.matches("[vout]").count(), spec.has_video() as usize, "video output label in {graph}");
});

/// The graph text without its backslash-escaped characters.
fn unescaped(graph: &str) -> String {
    let mut out = String::with_capacity(graph.len());
    let mut chars = graph.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            chars.next();
        } else {
            out.push(c);
        }
    }
    out
}
