//! The page a browser sees while its Space wakes or starts.

use http::HeaderMap;
use http::header::ACCEPT;

use crate::space::Stage;

/// Seconds between the loading page's reloads (also its `Retry-After`).
pub const RELOAD_SECONDS: u32 = 2;

/// A browser navigation: `GET` asking for HTML (API clients get held instead).
pub fn wants_html(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::GET
        && headers.get(ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|accept| accept.contains("text/html"))
}

/// Upper snake case as the hub shows it (`PENDING` before the first stage).
pub fn stage_name(stage: Option<Stage>) -> &'static str {
    stage.map_or("PENDING", Stage::as_str)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A small self-reloading page; the reload lands on the app once it is ready.
pub fn page(space_id: &str, stage: Option<Stage>, message: Option<&str>) -> String {
    let stage = stage_name(stage);
    let message = message.map(|m| format!("<p class=m>{}</p>", escape(m))).unwrap_or_default();
    let id = escape(space_id);
    format!(
        "<!doctype html><html><head><meta charset=utf-8>\
         <meta http-equiv=refresh content={RELOAD_SECONDS}>\
         <meta name=viewport content=\"width=device-width\"><title>{id} is starting</title>\
         <style>body{{font:16px system-ui,sans-serif;display:grid;place-items:center;height:90vh;color:#333}}\
         .s{{font-family:monospace;background:#eee;padding:2px 6px;border-radius:4px}}.m{{color:#666}}</style>\
         </head><body><main><h1>{id}</h1><p>Stage: <span class=s id=stage>{stage}</span></p>{message}\
         <p>This page reloads itself until the Space is ready.</p></main></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn page_shows_stage_and_escapes() {
        let p = page("alice/whisper", Some(Stage::AppStarting), Some("pulling <image>"));
        assert!(p.contains("<span class=s id=stage>APP_STARTING</span>"));
        assert!(p.contains("http-equiv=refresh content=2"));
        assert!(p.contains("pulling &lt;image&gt;"));
        assert_eq!(stage_name(None), "PENDING");
    }

    #[test]
    fn browsers_only() {
        let mut h = HeaderMap::new();
        assert!(!wants_html(&http::Method::GET, &h));
        h.insert(ACCEPT, HeaderValue::from_static("text/html,application/xhtml+xml,*/*;q=0.8"));
        assert!(wants_html(&http::Method::GET, &h));
        assert!(!wants_html(&http::Method::POST, &h));
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!wants_html(&http::Method::GET, &h));
    }
}
