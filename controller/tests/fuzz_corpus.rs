//! The manifest fuzz target's seed corpus (`fuzz/corpus/manifests`), replayed: reading any of
//! them gives objects or errors, never a panic.

#[test]
fn the_manifest_corpus_reads_without_a_panic() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/manifests");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let (objects, errors) = tidegate_controller::manifests::parse_str(text);
            assert!(objects.len() + errors.len() < 10_000, "{}", path.display());
        }
        seen += 1;
    }
    assert!(seen > 0, "no seed in {}", dir.display());
}
