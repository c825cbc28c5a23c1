#![no_main]

// A folder's file, as `tidegate standalone --manifests` reads it: never a panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tidegate_controller::manifests::parse_str(text);
    }
});
