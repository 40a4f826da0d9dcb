//! The OpenAPI documents of the services' HTTP APIs, as the handlers
//! generate them (`common::api_doc`), committed under
//! common/contracts/openapi/ by `cargo run -p stack -- contracts --write`.
//! Each service serves its own at `GET /openapi.json`, and so does the
//! operator console (`sagactl console`).

/// Where the documents are committed.
pub const DIR: &str = "common/contracts/openapi";

/// Each service's document: (path, text).
pub fn generated_files() -> Vec<(String, String)> {
    [
        ("order", order::api::openapi()),
        ("payment", payment::api::openapi()),
        ("inventory", inventory::api::openapi()),
        ("shipping", shipping::api::openapi()),
        ("console", sagactl::console::openapi()),
    ]
    .into_iter()
    .map(|(service, doc)| {
        let text = doc.to_pretty_json().expect("an OpenAPI document prints") + "\n";
        (format!("{DIR}/{service}.json"), text)
    })
    .collect()
}
