//! A Space repository's README.md front matter (the YAML between the two
//! `---` lines), typed, with errors that name the key and the README line.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU16;

use serde::{Deserialize, Deserializer, Serialize};

use super::hardware;
use super::resource::Sdk;

/// Every key of SPACES.md; anything else is kept in [`FrontMatter::extra`] and warned about.
pub const KNOWN_KEYS: &[&str] = &[
    "title",
    "emoji",
    "colorFrom",
    "colorTo",
    "short_description",
    "pinned",
    "license",
    "tags",
    "models",
    "datasets",
    "sdk",
    "sdk_version",
    "python_version",
    "app_file",
    "app_port",
    "base_path",
    "fullWidth",
    "header",
    "disable_embedding",
    "startup_duration_timeout",
    "custom_headers",
    "preload_from_hub",
    "suggested_hardware",
    "suggested_storage",
    "hf_oauth",
    "hf_oauth_scopes",
    "hf_oauth_expiration_minutes",
];

/// The typed front matter. `sdk` is optional here because a Space manifest may
/// set it instead; [`super::resolve`] reports it missing when neither does.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
pub struct FrontMatter {
    pub title: Option<String>,
    pub emoji: Option<String>,
    #[serde(rename = "colorFrom")]
    pub color_from: Option<String>,
    #[serde(rename = "colorTo")]
    pub color_to: Option<String>,
    pub short_description: Option<String>,
    pub pinned: Option<bool>,
    pub license: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub datasets: Vec<String>,
    pub sdk: Option<Sdk>,
    #[serde(default, deserialize_with = "version_string")]
    pub sdk_version: Option<String>,
    #[serde(default, deserialize_with = "python_version")]
    pub python_version: Option<String>,
    pub app_file: Option<String>,
    pub app_port: Option<NonZeroU16>,
    pub base_path: Option<String>,
    #[serde(rename = "fullWidth")]
    pub full_width: Option<bool>,
    pub header: Option<Header>,
    pub disable_embedding: Option<bool>,
    #[serde(default, deserialize_with = "duration_string")]
    pub startup_duration_timeout: Option<String>,
    #[serde(default)]
    pub custom_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub preload_from_hub: Vec<String>,
    #[serde(default, deserialize_with = "flavor_name")]
    pub suggested_hardware: Option<String>,
    pub suggested_storage: Option<Storage>,
    pub hf_oauth: Option<bool>,
    #[serde(default)]
    pub hf_oauth_scopes: Vec<String>,
    pub hf_oauth_expiration_minutes: Option<u32>,
    /// Keys SPACES.md does not know, kept as written.
    #[serde(skip)]
    pub extra: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Header {
    Mini,
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    Small,
    Medium,
    Large,
}

/// Why a README's front matter was refused. Lines count from 1, in README.md.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontMatterError {
    #[error("README.md has no front matter: its first line must be `---`, followed by YAML and a closing `---`")]
    Missing,
    #[error("README.md front matter opened at line {start} is never closed by a `---` line")]
    Unterminated { start: usize },
    #[error("README.md front matter is not valid YAML at line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("README.md front matter at line {line} must be a mapping of keys to values")]
    NotAMapping { line: usize },
    #[error(
        "README.md front matter (lines {start}-{end}) has no `sdk` key: set it to gradio, streamlit, docker or static"
    )]
    MissingSdk { start: usize, end: usize },
    #[error("README.md line {line}: invalid `{key}`: {message}")]
    InvalidValue { key: String, line: usize, message: String },
}

/// The YAML text between the `---` fences and the README line it starts on.
fn fenced_yaml(readme: &str) -> Result<(&str, usize, usize), FrontMatterError> {
    let text = readme.strip_prefix('\u{feff}').unwrap_or(readme);
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().ok_or(FrontMatterError::Missing)?;
    if first.trim_end() != "---" {
        return Err(FrontMatterError::Missing);
    }
    let body_start = first.len();
    let mut offset = body_start;
    for (i, line) in lines.enumerate() {
        if line.trim_end() == "---" {
            // README line numbers: the opening fence is line 1, YAML starts at 2.
            return Ok((&text[body_start..offset], 2, i + 2));
        }
        offset += line.len();
    }
    Err(FrontMatterError::Unterminated { start: 1 })
}

/// serde_yaml's messages carry " at line L column C" (YAML-relative, so
/// wrong for README.md) and may start with the key path: both are said
/// separately in our errors, so they are cut out here.
fn bare_message(err: &serde_yaml_ng::Error, key: &str) -> String {
    let text = err.to_string();
    let mut text = text.strip_prefix(&format!("{key}: ")).unwrap_or(&text).to_owned();
    while let Some(at) = text.find(" at line ") {
        let rest = &text[at + " at line ".len()..];
        let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
        let line_len = digits(rest);
        let Some(after) = rest[line_len..].strip_prefix(" column ") else { break };
        let end = at + " at line ".len() + line_len + " column ".len() + digits(after);
        text.replace_range(at..end, "");
    }
    text
}

/// The YAML line of each top-level key. serde_yaml locates errors raised by
/// our own validators at the start of the mapping, so those need this.
fn top_level_key_lines(yaml: &str) -> BTreeMap<&str, usize> {
    yaml.lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with([' ', '\t', '#', '-']))
        .filter_map(|(i, l)| {
            let key = l.split_once(':')?.0.trim().trim_matches(['"', '\'']);
            Some((key, i + 1))
        })
        .collect()
}

/// Parses README.md's front matter. Unknown keys are kept and logged, never fatal.
pub fn parse(readme: &str) -> Result<FrontMatter, FrontMatterError> {
    let (yaml, first_line, end_line) = fenced_yaml(readme)?;
    let readme_line = |yaml_line: usize| yaml_line + first_line - 1;

    // Pass 1: syntax and shape, and the keys as written.
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(yaml).map_err(|e| FrontMatterError::Syntax {
        line: readme_line(e.location().map_or(1, |l| l.line())),
        message: bare_message(&e, ""),
    })?;
    let mapping = match value {
        serde_yaml_ng::Value::Mapping(m) => m,
        // An empty front matter is an empty mapping, not an error of shape.
        serde_yaml_ng::Value::Null => serde_yaml_ng::Mapping::new(),
        _ => return Err(FrontMatterError::NotAMapping { line: first_line }),
    };

    // Pass 2: typed, straight from the text so errors keep their location.
    let de = serde_yaml_ng::Deserializer::from_str(yaml);
    let mut fm: FrontMatter = match serde_path_to_error::deserialize(de) {
        Ok(fm) => fm,
        Err(e) => {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let top_key = key.split(['.', '[']).next().unwrap_or_default();
            // A value's error cannot sit above its key: the later of the two is right.
            let yaml_line = inner
                .location()
                .map_or(1, |l| l.line())
                .max(top_level_key_lines(yaml).get(top_key).copied().unwrap_or(1));
            return Err(FrontMatterError::InvalidValue {
                line: readme_line(yaml_line),
                message: bare_message(&inner, &key),
                key,
            });
        }
    };
    for (k, v) in mapping {
        let name = match &k {
            serde_yaml_ng::Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other).unwrap_or_default().trim().to_owned(),
        };
        if !KNOWN_KEYS.contains(&name.as_str()) {
            tracing::warn!(key = %name, "README.md front matter: unknown key kept and ignored");
            fm.extra.insert(name, v);
        }
    }
    if fm.sdk.is_none() {
        return Err(FrontMatterError::MissingSdk { start: first_line - 1, end: end_line });
    }
    Ok(fm)
}

/// A version written as a string or as a bare YAML number (`sdk_version: 4.36`).
fn version_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a version such as \"4.36.1\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v.is_empty() || v.chars().any(char::is_whitespace) {
                return Err(E::custom(format!("{v:?} is not a version")));
            }
            Ok(Some(v.to_owned()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// `python_version`, e.g. `"3.10"`. A bare `3.10` is the YAML number 3.1: refuse
/// it rather than silently pick Python 3.1.
fn python_version<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    let Some(v) = version_string(d)? else { return Ok(None) };
    let minor = v.strip_prefix("3.").and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(1) => Err(D::Error::custom(format!(
            "{v} reads as a YAML number (3.10 == 3.1); quote it, e.g. python_version: \"3.10\""
        ))),
        Some(m) if (8..=14).contains(&m) => Ok(Some(v)),
        _ => Err(D::Error::custom(format!("unsupported Python version {v:?}: expected 3.8 to 3.14"))),
    }
}

fn duration_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    let Some(v) = Option::<String>::deserialize(d)? else { return Ok(None) };
    super::duration::parse(&v).map_err(D::Error::custom)?;
    Ok(Some(v))
}

fn flavor_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    let Some(v) = Option::<String>::deserialize(d)? else { return Ok(None) };
    hardware::lookup(&v).map_err(D::Error::custom)?;
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_match_the_struct() {
        let full = FrontMatter { sdk: Some(Sdk::Gradio), ..Default::default() };
        let value = serde_yaml_ng::to_value(&full).expect("serializes");
        let mapping = value.as_mapping().expect("a mapping");
        let mut keys: Vec<&str> = mapping.keys().filter_map(|k| k.as_str()).collect();
        let mut known = KNOWN_KEYS.to_vec();
        keys.sort_unstable();
        known.sort_unstable();
        assert_eq!(keys, known);
    }

    #[test]
    fn fence_positions() {
        assert_eq!(fenced_yaml("---\nsdk: gradio\n---\n# Title\n"), Ok(("sdk: gradio\n", 2, 3)));
        assert_eq!(fenced_yaml("---\r\nsdk: static\r\n---\r\n"), Ok(("sdk: static\r\n", 2, 3)));
        assert_eq!(fenced_yaml("# Title\n"), Err(FrontMatterError::Missing));
        assert_eq!(fenced_yaml(""), Err(FrontMatterError::Missing));
        assert_eq!(fenced_yaml("---\nsdk: gradio\n"), Err(FrontMatterError::Unterminated { start: 1 }));
    }
}
