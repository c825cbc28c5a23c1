//! The fuzz targets' seed corpus (`fuzz/corpus/`), replayed: every input that ever found
//! something stays fixed. The targets run for real with `fuzz/run.sh` (nightly, libFuzzer).

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("entry").path();
            let bytes = std::fs::read(&path).expect("read");
            (path, bytes)
        })
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no seed", dir.display());
    inputs
}

/// A fuzz target: its name (its corpus folder) and its entry point.
type Target = (&'static str, fn(&[u8]));

#[test]
fn the_seed_corpus_replays_without_a_finding() {
    let targets: [Target; 5] = [
        ("request_head", tidegate_proxy::fuzzing::request_head),
        ("chunked", tidegate_proxy::fuzzing::chunked),
        ("response_head", tidegate_proxy::fuzzing::response_head),
        ("proxy_protocol", tidegate_proxy::fuzzing::proxy_protocol),
        ("lua_headers", tidegate_proxy::fuzzing::lua_headers),
    ];
    for (target, run) in targets {
        for (path, input) in corpus(target) {
            let outcome = std::panic::catch_unwind(|| run(&input));
            assert!(outcome.is_ok(), "{target}: {} is a finding", path.display());
        }
    }
}
