//! The saga page (`GET /ui`): one static file that reads the JSON
//! endpoints and sets every value as text. Its policy forbids anything but
//! its own inline script and style, and requests to this service and, when
//! one is configured, to the operator console (`sagactl console`), where
//! the page sends redrives and retries; the console's origin is written
//! into the page once, at start.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{HeaderValue, header},
    response::IntoResponse,
};

/// The page as served: its HTML and its content security policy.
#[derive(Clone)]
pub struct Page {
    html: Arc<str>,
    policy: HeaderValue,
}

/// Where the page reads the console's origin from (empty: no console).
const CONSOLE_META: &str = r#"<meta name="operator-console" content="">"#;

impl Page {
    /// The page, sending operator actions to `console` (an origin checked
    /// by [`common::http::origin`]), or showing the commands without one.
    pub fn new(console: Option<&str>) -> Page {
        let console = console.and_then(|c| common::http::origin(c).ok());
        let template = include_str!("ui.html");
        let html = match &console {
            Some(origin) => template.replacen(
                CONSOLE_META,
                &format!(r#"<meta name="operator-console" content="{origin}">"#),
                1,
            ),
            None => template.to_string(),
        };
        let connect = match &console {
            Some(origin) => format!("'self' {origin}"),
            None => "'self'".to_string(),
        };
        let policy = format!(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src {connect}; form-action 'self'; base-uri 'none'"
        );
        Page {
            html: html.into(),
            policy: HeaderValue::from_str(&policy).expect("an origin is a header value"),
        }
    }
}

/// The saga page: a list of sagas and, with `?saga=<id>`, one saga's
/// timeline across the services; dead letters (`?view=dead-letters`), a
/// customer's orders (`?customer=`), and the operator's actions.
#[utoipa::path(get, path = "/ui", tag = "page",
    responses((status = 200, description = "The page", content_type = "text/html; charset=utf-8", body = String)))]
pub async fn page(State(page): State<Page>) -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CONTENT_SECURITY_POLICY, page.policy.clone()),
        ],
        page.html.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_the_console_and_may_call_it_only_when_one_is_configured() {
        let without = Page::new(None);
        assert!(without.html.contains(CONSOLE_META));
        assert!(
            without
                .policy
                .to_str()
                .unwrap()
                .contains("connect-src 'self';")
        );
        let with = Page::new(Some("http://127.0.0.1:8090/"));
        assert!(
            with.html
                .contains(r#"<meta name="operator-console" content="http://127.0.0.1:8090">"#)
        );
        assert!(
            with.policy
                .to_str()
                .unwrap()
                .contains("connect-src 'self' http://127.0.0.1:8090;")
        );
        // What is not an origin is never written into the page or its policy.
        let bad = Page::new(Some("http://a;script-src *"));
        assert!(bad.html.contains(CONSOLE_META));
        assert!(!bad.policy.to_str().unwrap().contains("script-src *"));
    }
}
