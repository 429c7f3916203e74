//! Front matter of realistic Space READMEs, and every bad input with its exact error.

use std::collections::BTreeMap;
use std::num::NonZeroU16;

use hangar::space::Sdk;
use hangar::space::front_matter::{self, FrontMatter, FrontMatterError, Header, Storage};
use proptest::prelude::*;

fn fixture(name: &str) -> FrontMatter {
    let path = format!("{}/tests/fixtures/readmes/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    front_matter::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn gradio_basic() {
    let fm = fixture("gradio-basic.md");
    assert_eq!(fm.title.as_deref(), Some("Image Classifier"));
    assert_eq!(fm.emoji.as_deref(), Some("🖼️"));
    assert_eq!((fm.color_from.as_deref(), fm.color_to.as_deref()), (Some("blue"), Some("purple")));
    assert_eq!(fm.sdk, Some(Sdk::Gradio));
    assert_eq!(fm.sdk_version.as_deref(), Some("4.36.1"));
    assert_eq!(fm.app_file.as_deref(), Some("app.py"));
    assert_eq!(fm.pinned, Some(false));
    assert_eq!(fm.license.as_deref(), Some("apache-2.0"));
    assert!(fm.extra.is_empty());
}

#[test]
fn gradio_with_lists_and_suggested_hardware() {
    let fm = fixture("gradio-models-lists.md");
    assert_eq!(fm.sdk_version.as_deref(), Some("5.9.1"));
    assert_eq!(fm.python_version.as_deref(), Some("3.11"));
    assert_eq!(fm.app_file.as_deref(), Some("main.py"));
    assert_eq!(fm.short_description.as_deref(), Some("Speech to text with Whisper"));
    assert_eq!(fm.tags, strings(&["audio", "speech-recognition", "whisper"]));
    assert_eq!(fm.models, strings(&["openai/whisper-large-v3", "openai/whisper-small"]));
    assert_eq!(fm.datasets, strings(&["mozilla-foundation/common_voice_11_0"]));
    assert_eq!(fm.suggested_hardware.as_deref(), Some("t4-small"));
    assert_eq!(fm.pinned, Some(true));
}

#[test]
fn streamlit_with_sdk_version() {
    let fm = fixture("streamlit-version.md");
    assert_eq!(fm.sdk, Some(Sdk::Streamlit));
    assert_eq!(fm.sdk_version.as_deref(), Some("1.36.0"));
    assert_eq!(fm.app_file.as_deref(), Some("streamlit_app.py"));
}

#[test]
fn docker_with_app_port() {
    let fm = fixture("docker-port.md");
    assert_eq!(fm.sdk, Some(Sdk::Docker));
    assert_eq!(fm.app_port, NonZeroU16::new(8000));
    assert_eq!(fm.app_file, None);
}

#[test]
fn docker_minimal() {
    let fm = fixture("docker-minimal.md");
    assert_eq!(fm, FrontMatter { sdk: Some(Sdk::Docker), ..Default::default() });
}

#[test]
fn static_site() {
    let fm = fixture("static-site.md");
    assert_eq!(fm.sdk, Some(Sdk::Static));
    assert_eq!(fm.app_file.as_deref(), Some("dist/index.html"));
}

#[test]
fn custom_headers() {
    let fm = fixture("custom-headers.md");
    let expected: BTreeMap<String, String> = [
        ("cross-origin-embedder-policy", "require-corp"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "cross-origin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(fm.custom_headers, expected);
}

#[test]
fn preload_from_hub_storage_and_startup_timeout() {
    let fm = fixture("preload.md");
    assert_eq!(
        fm.preload_from_hub,
        strings(&["meta-llama/Llama-3.2-1B-Instruct config.json,model.safetensors", "openai-community/gpt2"])
    );
    assert_eq!(fm.suggested_hardware.as_deref(), Some("a10g-small"));
    assert_eq!(fm.suggested_storage, Some(Storage::Medium));
    assert_eq!(fm.startup_duration_timeout.as_deref(), Some("1h"));
}

#[test]
fn oauth() {
    let fm = fixture("oauth.md");
    assert_eq!(fm.hf_oauth, Some(true));
    assert_eq!(fm.hf_oauth_scopes, strings(&["read-repos", "inference-api"]));
    assert_eq!(fm.hf_oauth_expiration_minutes, Some(480));
}

#[test]
fn display_options_and_base_path() {
    let fm = fixture("display-options.md");
    assert_eq!(fm.full_width, Some(true));
    assert_eq!(fm.header, Some(Header::Mini));
    assert_eq!(fm.disable_embedding, Some(true));
    assert_eq!(fm.base_path.as_deref(), Some("/dashboard"));
}

#[test]
fn unknown_keys_are_kept_not_fatal() {
    let fm = fixture("unknown-keys.md");
    assert_eq!(fm.sdk_version.as_deref(), Some("3.50.2"));
    let keys: Vec<&str> = fm.extra.keys().map(String::as_str).collect();
    assert_eq!(keys, ["duplicated_from", "thumbnail"]);
    assert_eq!(fm.extra["duplicated_from"].as_str(), Some("someone/original-space"));
}

#[test]
fn crlf_line_endings_and_byte_order_mark() {
    let fm = fixture("crlf-bom.md");
    assert_eq!(fm.title.as_deref(), Some("Windows Edited"));
    assert_eq!(fm.app_file.as_deref(), Some("app.py"));
}

#[test]
fn bare_number_versions() {
    let fm = fixture("number-versions.md");
    assert_eq!(fm.sdk_version.as_deref(), Some("5"));
    assert_eq!(fm.python_version.as_deref(), Some("3.9"));
}

fn error(readme: &str) -> FrontMatterError {
    front_matter::parse(readme).expect_err("must be refused")
}

fn invalid(key: &str, line: usize, message: &str) -> FrontMatterError {
    FrontMatterError::InvalidValue { key: key.into(), line, message: message.into() }
}

#[test]
fn missing_front_matter() {
    assert_eq!(error("# My Space\n\nsdk: gradio\n"), FrontMatterError::Missing);
    assert_eq!(error(""), FrontMatterError::Missing);
    assert_eq!(
        error("# x").to_string(),
        "README.md has no front matter: its first line must be `---`, followed by YAML and a closing `---`"
    );
}

#[test]
fn unterminated_front_matter() {
    assert_eq!(error("---\nsdk: gradio\n# Title\n"), FrontMatterError::Unterminated { start: 1 });
}

#[test]
fn missing_sdk() {
    let err = error("---\ntitle: No SDK\nemoji: 🤷\n---\n");
    assert_eq!(err, FrontMatterError::MissingSdk { start: 1, end: 4 });
    assert_eq!(
        err.to_string(),
        "README.md front matter (lines 1-4) has no `sdk` key: set it to gradio, streamlit, docker or static"
    );
    assert_eq!(error("---\n---\n"), FrontMatterError::MissingSdk { start: 1, end: 2 });
}

#[test]
fn unknown_sdk() {
    let err = error("---\ntitle: Bad\nsdk: flask\n---\n");
    assert_eq!(
        err,
        invalid("sdk", 3, "unknown variant `flask`, expected one of `gradio`, `streamlit`, `docker`, `static`")
    );
    assert_eq!(
        err.to_string(),
        "README.md line 3: invalid `sdk`: unknown variant `flask`, expected one of `gradio`, `streamlit`, `docker`, `static`"
    );
}

#[test]
fn invalid_yaml() {
    assert_eq!(
        error("---\ntitle: Broken\nsdk: [gradio\n---\n"),
        FrontMatterError::Syntax {
            line: 4,
            message: "did not find expected ',' or ']', while parsing a flow sequence".into()
        }
    );
    assert_eq!(error("---\n- sdk\n- gradio\n---\n"), FrontMatterError::NotAMapping { line: 2 });
}

#[test]
fn app_port_out_of_range() {
    assert_eq!(
        error("---\nsdk: docker\napp_port: 70000\n---\n"),
        invalid("app_port", 3, "invalid value: integer `70000`, expected a nonzero u16")
    );
    assert_eq!(
        error("---\nsdk: docker\napp_port: 0\n---\n"),
        invalid("app_port", 3, "invalid value: integer `0`, expected a nonzero u16")
    );
    assert_eq!(
        error("---\nsdk: docker\napp_port: http\n---\n"),
        invalid("app_port", 3, "invalid type: string \"http\", expected a nonzero u16")
    );
}

#[test]
fn unknown_hardware() {
    let err = error("---\nsdk: gradio\nsuggested_hardware: h100-mega\n---\n");
    let FrontMatterError::InvalidValue { key, line, message } = &err else { panic!("wrong error {err:?}") };
    assert_eq!((key.as_str(), *line), ("suggested_hardware", 3));
    assert!(
        message.starts_with("unknown hardware flavor \"h100-mega\" (known: cpu-basic, cpu-upgrade, t4-small"),
        "{message}"
    );
}

#[test]
fn python_version_as_a_yaml_number() {
    assert_eq!(
        error("---\nsdk: gradio\npython_version: 3.10\n---\n"),
        invalid(
            "python_version",
            3,
            "3.1 reads as a YAML number (3.10 == 3.1); quote it, e.g. python_version: \"3.10\""
        )
    );
}

#[test]
fn bad_startup_timeout_and_nested_key() {
    assert_eq!(
        error("---\nsdk: gradio\nstartup_duration_timeout: soon\n---\n"),
        invalid(
            "startup_duration_timeout",
            3,
            "invalid duration \"soon\": expected digits followed by a unit (ms, s, m, h, d), e.g. 15m, 48h or 1h30m"
        )
    );
    assert_eq!(
        error("---\nsdk: gradio\ntags:\n  - ok\n  - [nested]\n---\n"),
        invalid("tags[1]", 5, "invalid type: sequence, expected a string")
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary text never panics the parser.
    #[test]
    fn never_panics_on_arbitrary_text(text in ".{0,400}") {
        let _ = front_matter::parse(&text);
    }

    /// Nor does a fenced block of random YAML-ish lines built from real keys.
    #[test]
    fn never_panics_on_fenced_yaml(
        lines in proptest::collection::vec(
            (proptest::sample::select(front_matter::KNOWN_KEYS.to_vec()), "[ -~]{0,30}"),
            0..12,
        )
    ) {
        let mut readme = String::from("---\n");
        for (key, value) in &lines {
            readme.push_str(&format!("{key}: {value}\n"));
        }
        readme.push_str("---\n");
        if let Err(e) = front_matter::parse(&readme) {
            // Every error renders to a message.
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

/// A front matter as a Space repository would write it (the fields that carry text).
fn arb_front_matter() -> impl Strategy<Value = FrontMatter> {
    let text = "\\PC{0,24}";
    (
        proptest::sample::select(vec![Sdk::Gradio, Sdk::Streamlit, Sdk::Docker, Sdk::Static]),
        proptest::option::of(text),
        proptest::option::of(1u16..=65535),
        proptest::option::of("/[a-z0-9/_-]{0,12}"),
        proptest::collection::btree_map("[A-Za-z-]{1,30}", "[ -~]{0,20}", 0..4),
        proptest::collection::vec(text, 0..4),
        proptest::option::of(proptest::bool::ANY),
    )
        .prop_map(|(sdk, title, port, base_path, custom_headers, tags, pinned)| FrontMatter {
            sdk: Some(sdk),
            title,
            app_port: port.and_then(std::num::NonZeroU16::new),
            base_path,
            custom_headers,
            tags,
            pinned,
            ..FrontMatter::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// What serializes as a README's front matter parses back to itself, and
    /// resolving it into a configuration never panics (errors name a field).
    #[test]
    fn parse_of_render_round_trips(fm in arb_front_matter(), body in "\\PC{0,40}") {
        let yaml = serde_yaml_ng::to_string(&fm).expect("serializes");
        let readme = format!("---\n{yaml}---\n{body}\n");
        let parsed = front_matter::parse(&readme);
        prop_assert_eq!(parsed.as_ref(), Ok(&fm), "{}", readme);
        let spec = hangar::space::SpaceSpec { hardware: "cpu-basic".into(), ..Default::default() };
        if let Err(e) = hangar::space::resolve(&spec, Some(&fm)) {
            prop_assert!(!e.field.is_empty() && !e.message.is_empty());
        }
    }
}
