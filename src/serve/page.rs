//! The web chat page, embedded in the binary from `assets/chat.html`. It
//! loads nothing from outside the device: its script and styles are inline.

use axum::http::header;
use axum::response::IntoResponse;

/// The page's HTML.
pub const CHAT_HTML: &str = include_str!("../../assets/chat.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        CHAT_HTML,
    )
}
