//! docs/openapi.json is the admin API's OpenAPI document as the relay
//! generates it (`postback_relay::admin::openapi`); this fails when the
//! committed copy is stale. To write it again:
//!
//! ```sh
//! RELAY_WRITE_OPENAPI=1 cargo test --test relay admin_api_openapi
//! ```

use std::path::Path;

#[test]
fn docs_openapi_json_is_the_generated_document() {
    let generated = postback_relay::admin::openapi::pretty();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var_os("RELAY_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is not the document the code generates (an admin API type or endpoint changed); \
         write it again with `RELAY_WRITE_OPENAPI=1 cargo test --test relay admin_api_openapi` \
         and commit it",
        path.display()
    );
}

#[test]
fn the_document_is_openapi_3_1_and_has_every_endpoint() {
    let document: serde_json::Value =
        serde_json::from_str(&postback_relay::admin::openapi::pretty()).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    for (path, method) in [
        ("/api/v1/targets", "get"),
        ("/api/v1/targets/{name}/pause", "post"),
        ("/api/v1/targets/{name}/resume", "post"),
        ("/api/v1/dead-letters", "get"),
        ("/api/v1/dead-letters/{id}", "get"),
        ("/api/v1/dead-letters/replay", "post"),
        ("/api/v1/dead-letters/purge", "post"),
        ("/api/v1/quarantine", "get"),
        ("/api/v1/quarantine/{body_hash}", "get"),
        ("/api/v1/quarantine/replay", "post"),
        ("/api/v1/quarantine/purge", "post"),
    ] {
        let operation = &paths[path][method];
        assert!(operation.is_object(), "no {method} {path} in {paths:?}");
        for status in ["200", "401", "503"] {
            assert!(
                operation["responses"][status].is_object(),
                "{method} {path}: no {status} answer"
            );
        }
    }
    assert_eq!(paths.len(), 11, "{:?}", paths.keys().collect::<Vec<_>>());
    assert_eq!(document["security"], serde_json::json!([{"bearer": []}]));
}
