//! The build plan: from a checked-out repository (its README front matter and
//! file list) and the Space's spec to the Dockerfile, build args and files the
//! image build needs. Pure: the caller reads the repository, this decides.

use std::collections::{BTreeMap, BTreeSet};

use crate::space::{AppConfig, FrontMatter, Sdk, SpaceSpec, front_matter};

/// Where generated files live inside the build context (kept out of the image
/// by the `.dockerignore` the plan writes).
pub const GENERATED_DIR: &str = ".hangar";
/// Path of the generated Dockerfile inside the build context.
pub const GENERATED_DOCKERFILE: &str = ".hangar/Dockerfile";
/// Path of the extra CA bundle inside the build context, when one is configured.
pub const EXTRA_CA_PATH: &str = ".hangar/extra-ca.crt";
/// The unprivileged user every generated image runs as (the hub's convention).
pub const APP_UID: u32 = 1000;

/// How the static-site image serves files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticServer {
    /// Image with a static file server (e.g. busybox httpd, nginx).
    pub image: String,
    /// Directory the repository's files are copied into.
    pub root: String,
    /// Command that serves `{root}` on `{port}` (placeholders substituted).
    pub command: Vec<String>,
}

impl StaticServer {
    /// busybox httpd, as in the test bed's static image: `/www`, `-p <port>`.
    pub fn busybox(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            root: "/www".to_owned(),
            command: ["/bin/busybox", "httpd", "-f", "-v", "-p", "{port}", "-h", "{root}"].map(str::to_owned).to_vec(),
        }
    }
}

/// Settings of the plan that come from the builder's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSettings {
    /// Python base image; `{python_version}` is replaced by the Space's version
    /// (e.g. `python:{python_version}-slim`). Without the placeholder every
    /// Space gets this one image.
    pub python_base_image: String,
    /// Base images by `python_version` (`"3.11"` -> image). A Space that
    /// sets a version gets its entry here; a version missing here is a
    /// `CONFIG_ERROR` naming those available, unless `python_base_image`
    /// has the placeholder (then any version is built from it). Empty: every
    /// Space gets `python_base_image`, as it is.
    pub python_images: BTreeMap<String, String>,
    pub static_server: StaticServer,
    /// Whether an extra CA bundle is put into the context at [`EXTRA_CA_PATH`]:
    /// generated images then trust it for pip (corporate TLS proxies).
    pub extra_ca: bool,
    /// The engine builds with BuildKit: the Space's secrets are offered as
    /// secret mounts (the classic builder has none, and rejects `--mount`).
    pub buildkit: bool,
}

/// What the repository holds, as far as the plan cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoView {
    /// README.md's text, if the file exists.
    pub readme: Option<String>,
    /// Every regular file and symlink, relative, `/`-separated (no `.git`).
    pub files: BTreeSet<String>,
    /// The repository's own `.dockerignore`, if any.
    pub dockerignore: Option<String>,
}

/// The image to build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildPlan {
    pub app_config: AppConfig,
    /// The Dockerfile path inside the context.
    pub dockerfile_path: String,
    /// The generated Dockerfile; `None` when the repository's own is used.
    pub dockerfile: Option<String>,
    /// Content of `.dockerignore` to write into the context (generated SDKs
    /// keep [`GENERATED_DIR`] out of the image); `None`: leave the repo's.
    pub dockerignore: Option<String>,
    /// The Space's variables, passed as build args.
    pub build_args: BTreeMap<String, String>,
    /// The base image (`FROM`) of a generated Dockerfile.
    pub base_image: Option<String>,
    /// Names of the Space's secrets offered to the build as BuildKit secret
    /// mounts (`RUN --mount=type=secret,id=NAME`); empty without BuildKit.
    pub secrets: BTreeSet<String>,
}

/// Why a repository cannot be built; each maps onto a Space stage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Stage `NO_APP_FILE`.
    #[error("{0}")]
    NoAppFile(String),
    /// Stage `CONFIG_ERROR`.
    #[error("{0}")]
    Config(String),
}

/// Decides the build of `repo` for `spec`. `variables` become build args.
pub fn plan(
    spec: &SpaceSpec,
    repo: &RepoView,
    variables: &BTreeMap<String, String>,
    settings: &PlanSettings,
) -> Result<BuildPlan, PlanError> {
    let front_matter = read_front_matter(spec, repo)?;
    let app_config = crate::space::resolve(spec, front_matter.as_ref())
        .map_err(|e| PlanError::Config(format!("invalid configuration: {e}")))?;
    for name in variables.keys() {
        if !is_env_name(name) {
            return Err(PlanError::Config(format!("variable {name:?} is not a valid environment variable name")));
        }
    }
    let build_args = variables.clone();
    let secrets: BTreeSet<String> =
        if settings.buildkit { spec.secrets.iter().map(|s| s.name.clone()).collect() } else { BTreeSet::new() };
    for name in &secrets {
        if !is_env_name(name) {
            return Err(PlanError::Config(format!("secret {name:?} is not a valid environment variable name")));
        }
    }
    match app_config.sdk {
        Sdk::Docker => {
            if !repo.files.contains("Dockerfile") {
                return Err(PlanError::NoAppFile(
                    "sdk is docker but the repository has no Dockerfile at its root".to_owned(),
                ));
            }
            Ok(BuildPlan {
                app_config,
                dockerfile_path: "Dockerfile".to_owned(),
                dockerfile: None,
                dockerignore: None,
                build_args,
                base_image: None,
                secrets,
            })
        }
        Sdk::Gradio | Sdk::Streamlit | Sdk::Static => {
            let app_file = app_config.app_file.clone().unwrap_or_default();
            if !repo.files.contains(&app_file) {
                return Err(PlanError::NoAppFile(format!(
                    "app_file {app_file:?} not found in the repository (sdk {})",
                    app_config.sdk.as_str()
                )));
            }
            let (dockerfile, base_image) = if app_config.sdk == Sdk::Static {
                static_dockerfile(&app_config, &app_file, settings)
            } else {
                let asked =
                    spec.python_version.as_deref().or(front_matter.as_ref().and_then(|f| f.python_version.as_deref()));
                let base = python_base(settings, asked, &app_config.python_version).map_err(PlanError::Config)?;
                python_dockerfile(&app_config, &base, &app_file, repo, &build_args, &secrets, settings)
            };
            let mut dockerignore = repo.dockerignore.clone().unwrap_or_default();
            if !dockerignore.is_empty() && !dockerignore.ends_with('\n') {
                dockerignore.push('\n');
            }
            dockerignore.push_str(GENERATED_DIR);
            dockerignore.push('\n');
            Ok(BuildPlan {
                app_config,
                dockerfile_path: GENERATED_DOCKERFILE.to_owned(),
                dockerfile: Some(dockerfile),
                dockerignore: Some(dockerignore),
                build_args,
                base_image: Some(base_image),
                secrets,
            })
        }
    }
}

/// The front matter, or `None` when there is no README and the spec alone
/// can decide (it sets `sdk`). A README that exists must parse.
fn read_front_matter(spec: &SpaceSpec, repo: &RepoView) -> Result<Option<FrontMatter>, PlanError> {
    match &repo.readme {
        Some(text) => match front_matter::parse(text) {
            Ok(fm) => Ok(Some(fm)),
            // The spec may carry the sdk a README lacks: that README is still fine.
            Err(front_matter::FrontMatterError::MissingSdk { .. }) if spec.sdk.is_some() => {
                Ok(Some(FrontMatter::default()))
            }
            Err(front_matter::FrontMatterError::Missing) if spec.sdk.is_some() => Ok(None),
            Err(e) => Err(PlanError::Config(e.to_string())),
        },
        None if spec.sdk.is_some() => Ok(None),
        None => Err(PlanError::Config(
            "the repository has no README.md (its front matter must set `sdk`), and spec.sdk is not set".to_owned(),
        )),
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A JSON string (Dockerfile exec form accepts JSON arrays).
fn json(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn exec_form(args: &[String]) -> String {
    let parts: Vec<String> = args.iter().map(|a| json(a)).collect();
    format!("[{}]", parts.join(", "))
}

/// The base image of a Python Space that asked for `asked` (its
/// `python_version`, if it set one; `default` otherwise).
fn python_base(settings: &PlanSettings, asked: Option<&str>, default: &str) -> Result<String, String> {
    let template = &settings.python_base_image;
    match asked {
        Some(v) if settings.python_images.contains_key(v) => Ok(settings.python_images[v].clone()),
        Some(v) if !settings.python_images.is_empty() && !template.contains("{python_version}") => {
            let available: Vec<&str> = settings.python_images.keys().map(String::as_str).collect();
            Err(format!(
                "python_version {v:?} is not available here (available: {}); set one of those, \
                 or leave python_version out for the default image",
                available.join(", ")
            ))
        }
        Some(v) => Ok(template.replace("{python_version}", v)),
        None => Ok(template.replace("{python_version}", default)),
    }
}

/// The CA setup lines: the extra bundle appended to the system one, and the
/// variables pip, requests and OpenSSL read pointing at the result.
fn ca_lines(settings: &PlanSettings) -> String {
    if !settings.extra_ca {
        return String::new();
    }
    format!(
        "COPY {EXTRA_CA_PATH} /usr/local/share/hangar/extra-ca.crt\n\
         RUN cat /etc/ssl/certs/ca-certificates.crt /usr/local/share/hangar/extra-ca.crt \
         > /usr/local/share/hangar/ca-bundle.crt 2>/dev/null \
         || cp /usr/local/share/hangar/extra-ca.crt /usr/local/share/hangar/ca-bundle.crt\n\
         ENV PIP_CERT=/usr/local/share/hangar/ca-bundle.crt \
         SSL_CERT_FILE=/usr/local/share/hangar/ca-bundle.crt \
         REQUESTS_CA_BUNDLE=/usr/local/share/hangar/ca-bundle.crt\n"
    )
}

/// A `RUN` of `command` that sees the Space's secrets as environment
/// variables (pip expands `${NAME}` in requirements files, e.g. a token in a
/// private index URL), read from BuildKit secret mounts: the values live on a
/// tmpfs for this one step and stay out of the layer, the history and the
/// cache key. Engine 20.10's Dockerfile frontend has no `env=` mount option,
/// hence the files under `/run/secrets`.
fn run_with_secrets(secrets: &BTreeSet<String>, command: &str) -> String {
    if secrets.is_empty() {
        return format!("RUN {command}\n");
    }
    let mounts: Vec<String> = secrets.iter().map(|s| format!("--mount=type=secret,id={s}")).collect();
    let names: Vec<&str> = secrets.iter().map(String::as_str).collect();
    format!(
        "RUN {} for s in {}; do if [ -f \"/run/secrets/$s\" ]; then export \"$s=$(cat \"/run/secrets/$s\")\"; fi; done; {command}\n",
        mounts.join(" "),
        names.join(" ")
    )
}

fn python_dockerfile(
    cfg: &AppConfig,
    base: &str,
    app_file: &str,
    repo: &RepoView,
    build_args: &BTreeMap<String, String>,
    secrets: &BTreeSet<String>,
    settings: &PlanSettings,
) -> (String, String) {
    let port = cfg.app_port;
    let package = match cfg.sdk {
        Sdk::Streamlit => "streamlit",
        _ => "gradio",
    };
    let requirement = match &cfg.sdk_version {
        Some(v) => format!("{package}=={v}"),
        None => package.to_owned(),
    };
    let mut d = String::new();
    d.push_str("# Generated by hangar: do not edit (it is rebuilt from README.md's front matter).\n");
    d.push_str(&format!("FROM {base}\n"));
    // Variables are visible to the build's RUN steps as build args.
    for name in build_args.keys() {
        d.push_str(&format!("ARG {name}\n"));
    }
    d.push_str(&ca_lines(settings));
    // PIP_BREAK_SYSTEM_PACKAGES: Debian-style bases refuse system-wide pip otherwise.
    d.push_str(
        "ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1\n",
    );
    if repo.files.contains("packages.txt") {
        d.push_str(
            "COPY packages.txt /tmp/hangar-packages.txt\n\
             RUN apt-get update && xargs -r apt-get install -y --no-install-recommends < /tmp/hangar-packages.txt \
             && rm -rf /var/lib/apt/lists/*\n",
        );
    }
    d.push_str(&run_with_secrets(secrets, &format!("python3 -m pip install {}", shell_quote(&requirement))));
    if repo.files.contains("requirements.txt") {
        d.push_str("COPY requirements.txt /tmp/hangar-requirements.txt\n");
        d.push_str(&run_with_secrets(secrets, "python3 -m pip install -r /tmp/hangar-requirements.txt"));
    }
    d.push_str(&spaces_shim());
    // The hub runs apps as uid 1000 with a writable home.
    d.push_str(&format!(
        "RUN (getent passwd {APP_UID} >/dev/null || useradd -m -u {APP_UID} user 2>/dev/null \
         || adduser -D -u {APP_UID} user) && mkdir -p /home/user/app && chown -R {APP_UID}:{APP_UID} /home/user\n"
    ));
    d.push_str("ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH\n");
    d.push_str("WORKDIR /home/user/app\n");
    d.push_str(&format!("COPY --chown={APP_UID}:{APP_UID} . /home/user/app\n"));
    d.push_str(&format!("USER {APP_UID}\n"));
    let cmd: Vec<String> = match cfg.sdk {
        Sdk::Streamlit => {
            d.push_str(&format!(
                "ENV STREAMLIT_SERVER_PORT={port} STREAMLIT_SERVER_ADDRESS=0.0.0.0 STREAMLIT_SERVER_HEADLESS=true\n"
            ));
            ["python3", "-m", "streamlit", "run", app_file]
                .into_iter()
                .map(str::to_owned)
                .chain([format!("--server.port={port}"), "--server.address=0.0.0.0".to_owned()])
                .collect()
        }
        _ => {
            // No `spaces` package: with SYSTEM=spaces and SPACE_ID set, Gradio 6 starts its
            // hot-reload watcher, which without `spaces` only prints a traceback (the app
            // serves), but with it runs `spaces`' unauthenticated code-reload server on
            // 0.0.0.0:7887, reachable from every pod. SYSTEM stays (apps read it).
            d.push_str(&format!("ENV GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT={port}\n"));
            vec!["python3".to_owned(), app_file.to_owned()]
        }
    };
    d.push_str(&format!("EXPOSE {port}\n"));
    d.push_str(&format!("CMD {}\n", exec_form(&cmd)));
    (d, base.to_owned())
}

fn static_dockerfile(cfg: &AppConfig, app_file: &str, settings: &PlanSettings) -> (String, String) {
    let server = &settings.static_server;
    let root = server.root.trim_end_matches('/');
    // An app_file in a sub-directory (dist/index.html) makes that directory the site root.
    let site = match app_file.rsplit_once('/') {
        Some((dir, _)) => format!("{root}/{dir}"),
        None => root.to_owned(),
    };
    let port = cfg.app_port.to_string();
    let cmd: Vec<String> = server.command.iter().map(|a| a.replace("{port}", &port).replace("{root}", &site)).collect();
    let mut d = String::new();
    d.push_str("# Generated by hangar: do not edit (it is rebuilt from README.md's front matter).\n");
    d.push_str(&format!("FROM {}\n", server.image));
    d.push_str(&format!("COPY --chown={APP_UID}:{APP_UID} . {root}/\n"));
    d.push_str(&format!("USER {APP_UID}\n"));
    d.push_str(&format!("EXPOSE {port}\n"));
    d.push_str(&format!("CMD {}\n", exec_form(&cmd)));
    (d, server.image.clone())
}

/// Where the `spaces` stand-in lives in generated Python images.
pub const SHIM_DIR: &str = "/usr/local/lib/hangar-shims";

/// A no-op stand-in for the hub's `spaces` package: apps that
/// `import spaces` for `@spaces.GPU` / `@spaces.GPU(duration=...)` (ZeroGPU,
/// which hangar does not have) run their functions as they are. No blank
/// lines (each line is one shell word).
const SPACES_SHIM: &str = r#""""A stand-in for the Hugging Face `spaces` package, made by hangar.
hangar has no ZeroGPU: @spaces.GPU runs the function as it is, on whatever
GPU the hardware of the Space gives. A real `spaces` package, if installed,
is found first: this directory comes last on sys.path.
"""
__all__ = ["GPU", "gradio_auto_wrap"]
def GPU(*args, **kwargs):
    """@spaces.GPU, @spaces.GPU() and @spaces.GPU(duration=...): the function unchanged."""
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    def decorate(fn):
        return fn
    return decorate
def gradio_auto_wrap(fn):
    """Gradio wraps every event function with this when SPACE_ID is set."""
    return fn
"#;

/// The `RUN` that installs [`SPACES_SHIM`] in [`SHIM_DIR`], put on `sys.path`
/// by a `.pth` file: `.pth` directories go after site-packages, so a real
/// `spaces` wins. It carries no package metadata, so Gradio's Spaces
/// hot-reload (which asks for `spaces>=0.43` and its reload server) stays
/// off, as without any `spaces`.
fn spaces_shim() -> String {
    let lines: Vec<String> = SPACES_SHIM.lines().map(shell_quote).collect();
    format!(
        "RUN mkdir -p {SHIM_DIR}/spaces && printf '%s\\n' {} > {SHIM_DIR}/spaces/__init__.py \\\n    \
         && python3 -c 'import os, site; d = site.getsitepackages()[0]; os.makedirs(d, exist_ok=True); \
         open(os.path.join(d, \"hangar-shims.pth\"), \"w\").write(\"{SHIM_DIR}\\n\")'\n",
        lines.join(" ")
    )
}

/// Single-quotes a word for /bin/sh.
fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "=._-+".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::GitSource;

    fn spec() -> SpaceSpec {
        SpaceSpec {
            source: Some(GitSource { git: "file:///r".into(), revision: "main".into(), credentials_secret: None }),
            hardware: "cpu-basic".into(),
            ..Default::default()
        }
    }

    fn settings(extra_ca: bool) -> PlanSettings {
        PlanSettings {
            python_base_image: "python:{python_version}-slim".into(),
            python_images: BTreeMap::new(),
            static_server: StaticServer::busybox("hangar/static:1"),
            extra_ca,
            buildkit: true,
        }
    }

    fn repo(readme: &str, files: &[&str]) -> RepoView {
        RepoView {
            readme: Some(readme.to_owned()),
            files: files.iter().map(|f| (*f).to_owned()).chain(["README.md".to_owned()]).collect(),
            dockerignore: None,
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn gradio_generates_a_pinned_pip_install_as_uid_1000_on_7860() {
        let r = repo(
            "---\nsdk: gradio\nsdk_version: 4.44.1\npython_version: '3.11'\n---\n",
            &["app.py", "requirements.txt"],
        );
        let p = plan(&spec(), &r, &vars(&[("MODEL", "small")]), &settings(true)).expect("plan");
        let d = p.dockerfile.as_deref().expect("generated");
        assert_eq!(p.dockerfile_path, GENERATED_DOCKERFILE);
        assert_eq!(p.base_image.as_deref(), Some("python:3.11-slim"));
        assert!(d.contains("FROM python:3.11-slim\n"), "{d}");
        assert!(d.contains("ARG MODEL\n"), "{d}");
        assert!(d.contains("RUN python3 -m pip install gradio==4.44.1\n"), "{d}");
        assert!(d.contains("RUN python3 -m pip install -r /tmp/hangar-requirements.txt\n"), "{d}");
        assert!(d.contains("USER 1000\n"), "{d}");
        assert!(d.contains("GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860"), "{d}");
        assert!(d.contains("EXPOSE 7860\n"), "{d}");
        assert!(d.ends_with("CMD [\"python3\", \"app.py\"]\n"), "{d}");
        // The CA is set up before any pip install.
        let ca = d.find("PIP_CERT=").expect("CA env");
        assert!(ca < d.find("pip install").expect("pip"), "{d}");
        assert_eq!(p.dockerignore.as_deref(), Some(".hangar\n"));
        assert_eq!(p.build_args, vars(&[("MODEL", "small")]));
    }

    #[test]
    fn streamlit_runs_its_app_file_on_8501_and_unpinned_without_version() {
        let r = repo("---\nsdk: streamlit\napp_file: src/main.py\n---\n", &["src/main.py"]);
        let p = plan(&spec(), &r, &BTreeMap::new(), &settings(false)).expect("plan");
        let d = p.dockerfile.as_deref().expect("generated");
        assert!(d.contains("RUN python3 -m pip install streamlit\n"), "{d}");
        assert!(!d.contains("requirements"), "{d}");
        assert!(!d.contains("PIP_CERT"), "no extra CA configured: {d}");
        assert!(d.contains("FROM python:3.10-slim\n"), "default python version: {d}");
        assert!(
            d.ends_with(
                "CMD [\"python3\", \"-m\", \"streamlit\", \"run\", \"src/main.py\", \"--server.port=8501\", \"--server.address=0.0.0.0\"]\n"
            ),
            "{d}"
        );
        assert_eq!(p.app_config.app_port, 8501);
    }

    #[test]
    fn static_serves_the_app_files_directory_on_the_app_port() {
        let r = repo("---\nsdk: static\napp_file: dist/index.html\n---\n", &["dist/index.html"]);
        let p = plan(&spec(), &r, &BTreeMap::new(), &settings(true)).expect("plan");
        let d = p.dockerfile.as_deref().expect("generated");
        assert!(d.starts_with("# Generated"), "{d}");
        assert!(d.contains("FROM hangar/static:1\n"), "{d}");
        assert!(d.contains("COPY --chown=1000:1000 . /www/\nUSER 1000\nEXPOSE 7860\n"), "{d}");
        assert!(
            d.ends_with("CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-v\", \"-p\", \"7860\", \"-h\", \"/www/dist\"]\n"),
            "{d}"
        );
        assert!(!d.contains("PIP_CERT"), "static images need no CA for pip: {d}");
    }

    #[test]
    fn docker_uses_the_repository_dockerfile_and_its_app_port() {
        let r = repo("---\nsdk: docker\napp_port: 8080\n---\n", &["Dockerfile"]);
        let p = plan(&spec(), &r, &vars(&[("A", "1")]), &settings(false)).expect("plan");
        assert_eq!((p.dockerfile_path.as_str(), p.dockerfile.as_deref()), ("Dockerfile", None));
        assert_eq!(p.app_config.app_port, 8080);
        assert_eq!(p.dockerignore, None);
        let r = repo("---\nsdk: docker\n---\n", &[]);
        assert_eq!(p.build_args, vars(&[("A", "1")]));
        assert!(
            matches!(plan(&spec(), &r, &BTreeMap::new(), &settings(false)), Err(PlanError::NoAppFile(m)) if m.contains("Dockerfile"))
        );
    }

    #[test]
    fn missing_app_file_is_no_app_file() {
        let r = repo("---\nsdk: gradio\n---\n", &["main.py"]);
        let err = plan(&spec(), &r, &BTreeMap::new(), &settings(false)).expect_err("no app.py");
        assert_eq!(err, PlanError::NoAppFile("app_file \"app.py\" not found in the repository (sdk gradio)".into()));
        let r = repo("---\nsdk: static\n---\n", &["about.html"]);
        assert!(matches!(plan(&spec(), &r, &BTreeMap::new(), &settings(false)), Err(PlanError::NoAppFile(_))));
    }

    #[test]
    fn bad_or_missing_front_matter_is_config_error() {
        let s = settings(false);
        let none = BTreeMap::new();
        let no_fm = repo("# My space\n", &["app.py"]);
        assert!(matches!(plan(&spec(), &no_fm, &none, &s), Err(PlanError::Config(m)) if m.contains("no front matter")));
        let bad = repo("---\nsdk: gradio\napp_port: [1\n---\n", &["app.py"]);
        assert!(matches!(plan(&spec(), &bad, &none, &s), Err(PlanError::Config(m)) if m.contains("line")));
        let no_sdk = repo("---\ntitle: x\n---\n", &["app.py"]);
        assert!(matches!(plan(&spec(), &no_sdk, &none, &s), Err(PlanError::Config(m)) if m.contains("sdk")));
        let no_readme = RepoView { readme: None, files: ["app.py".to_owned()].into(), dockerignore: None };
        assert!(matches!(plan(&spec(), &no_readme, &none, &s), Err(PlanError::Config(m)) if m.contains("README.md")));
        // ... unless the spec sets the sdk itself.
        let with_sdk = SpaceSpec { sdk: Some(Sdk::Gradio), ..spec() };
        assert!(plan(&with_sdk, &no_readme, &none, &s).is_ok());
        assert!(plan(&with_sdk, &no_fm, &none, &s).is_ok());
        assert!(plan(&with_sdk, &no_sdk, &none, &s).is_ok());
        // An unknown flavor is a configuration error too.
        let flavor = SpaceSpec { hardware: "h100".into(), ..spec() };
        let ok = repo("---\nsdk: gradio\n---\n", &["app.py"]);
        assert!(matches!(plan(&flavor, &ok, &none, &s), Err(PlanError::Config(m)) if m.contains("spec.hardware")));
        let bad_var = vars(&[("NOT-A-NAME", "x")]);
        assert!(matches!(plan(&spec(), &ok, &bad_var, &s), Err(PlanError::Config(m)) if m.contains("NOT-A-NAME")));
    }

    #[test]
    fn spec_overrides_front_matter_and_keeps_user_dockerignore() {
        let mut r = repo("---\nsdk: gradio\nsdk_version: 4.0.0\n---\n", &["app.py", "packages.txt"]);
        r.dockerignore = Some("*.ckpt".into());
        let sp = SpaceSpec { sdk_version: Some("5.1.0".into()), app_port: Some(9000), ..spec() };
        let p = plan(&sp, &r, &BTreeMap::new(), &settings(false)).expect("plan");
        let d = p.dockerfile.as_deref().expect("generated");
        assert!(d.contains("pip install gradio==5.1.0\n"), "{d}");
        assert!(d.contains("GRADIO_SERVER_PORT=9000"), "{d}");
        assert!(d.contains("xargs -r apt-get install"), "{d}");
        assert_eq!(p.dockerignore.as_deref(), Some("*.ckpt\n.hangar\n"));
    }

    #[test]
    fn python_base_without_placeholder_is_used_as_is() {
        let s = PlanSettings { python_base_image: "hangar/python:3.11".into(), ..settings(false) };
        let r = repo("---\nsdk: gradio\npython_version: '3.12'\n---\n", &["app.py"]);
        let p = plan(&spec(), &r, &BTreeMap::new(), &s).expect("plan");
        assert_eq!(p.base_image.as_deref(), Some("hangar/python:3.11"));
    }

    #[test]
    fn python_versions_map_to_configured_images_and_others_are_config_errors() {
        let images: BTreeMap<String, String> =
            [("3.11", "hangar/python:3.11"), ("3.12", "hangar/python:3.12")].map(|(k, v)| (k.into(), v.into())).into();
        let s =
            PlanSettings { python_base_image: "hangar/python:3.11".into(), python_images: images, ..settings(false) };
        let base = |readme: &str| plan(&spec(), &repo(readme, &["app.py"]), &BTreeMap::new(), &s).map(|p| p.base_image);
        assert_eq!(base("---\nsdk: gradio\npython_version: '3.12'\n---\n"), Ok(Some("hangar/python:3.12".into())));
        assert_eq!(base("---\nsdk: gradio\n---\n"), Ok(Some("hangar/python:3.11".into())), "unset: the default");
        let err = base("---\nsdk: gradio\npython_version: '3.10'\n---\n").expect_err("not available");
        assert_eq!(
            err,
            PlanError::Config(
                "python_version \"3.10\" is not available here (available: 3.11, 3.12); set one of those, \
                 or leave python_version out for the default image"
                    .into()
            )
        );
        // The spec's python_version counts like the front matter's.
        let sp = SpaceSpec { python_version: Some("3.9".into()), ..spec() };
        let r = repo("---\nsdk: gradio\n---\n", &["app.py"]);
        assert!(matches!(plan(&sp, &r, &BTreeMap::new(), &s), Err(PlanError::Config(m)) if m.contains("\"3.9\"")));
        // A template builds any version; the map still picks its own images.
        let t = PlanSettings { python_base_image: "python:{python_version}-slim".into(), ..s.clone() };
        let base = |readme: &str| plan(&spec(), &repo(readme, &["app.py"]), &BTreeMap::new(), &t).map(|p| p.base_image);
        assert_eq!(base("---\nsdk: gradio\npython_version: '3.10'\n---\n"), Ok(Some("python:3.10-slim".into())));
        assert_eq!(base("---\nsdk: gradio\npython_version: '3.12'\n---\n"), Ok(Some("hangar/python:3.12".into())));
    }

    #[test]
    fn python_images_get_the_spaces_stand_in() {
        let r = repo("---\nsdk: gradio\n---\n", &["app.py"]);
        let d = plan(&spec(), &r, &BTreeMap::new(), &settings(false)).expect("plan").dockerfile.expect("generated");
        let run = d.lines().find(|l| l.contains("hangar-shims/spaces/__init__.py")).expect("the shim is installed");
        assert!(run.starts_with("RUN mkdir -p /usr/local/lib/hangar-shims/spaces && printf '%s\\n' "), "{run}");
        assert!(d.contains("def GPU(*args, **kwargs):") && d.contains("hangar-shims.pth"), "{d}");
        // Before the app is copied in (a layer of its own), after the requirements.
        assert!(d.find("hangar-shims").expect("shim") < d.find("COPY --chown").expect("copy"), "{d}");
        let st = plan(&spec(), &repo("---\nsdk: static\n---\n", &["index.html"]), &BTreeMap::new(), &settings(false));
        assert!(!st.expect("plan").dockerfile.expect("generated").contains("hangar-shims"));
    }

    #[test]
    fn secrets_are_mounted_on_the_pip_steps_only_with_buildkit() {
        use crate::space::{SecretKeyRef, SpaceSecret};
        let secret = |name: &str| SpaceSecret {
            name: name.into(),
            secret_key_ref: SecretKeyRef { name: "s".into(), key: "k".into() },
        };
        let sp = SpaceSpec { secrets: vec![secret("PIP_TOKEN"), secret("HF_TOKEN")], ..spec() };
        let r = repo("---\nsdk: streamlit\nsdk_version: 1.40.0\n---\n", &["app.py", "requirements.txt"]);
        let p = plan(&sp, &r, &BTreeMap::new(), &settings(false)).expect("plan");
        let d = p.dockerfile.as_deref().expect("generated");
        let mount = "RUN --mount=type=secret,id=HF_TOKEN --mount=type=secret,id=PIP_TOKEN \
                     for s in HF_TOKEN PIP_TOKEN; do if [ -f \"/run/secrets/$s\" ]; \
                     then export \"$s=$(cat \"/run/secrets/$s\")\"; fi; done; ";
        assert!(d.contains(&format!("{mount}python3 -m pip install streamlit==1.40.0\n")), "{d}");
        assert!(d.contains(&format!("{mount}python3 -m pip install -r /tmp/hangar-requirements.txt\n")), "{d}");
        assert_eq!(d.matches("--mount=type=secret,id=PIP_TOKEN").count(), 2, "only the two pip steps: {d}");
        assert_eq!(p.secrets, ["HF_TOKEN".to_owned(), "PIP_TOKEN".to_owned()].into());
        // The classic builder rejects `--mount`: no mounts, nothing offered.
        let classic = PlanSettings { buildkit: false, ..settings(false) };
        let p = plan(&sp, &r, &BTreeMap::new(), &classic).expect("plan");
        assert!(!p.dockerfile.as_deref().expect("generated").contains("--mount"));
        assert!(p.secrets.is_empty());
        // A docker Space's own Dockerfile mounts what it wants; the plan offers all.
        let d = repo("---\nsdk: docker\n---\n", &["Dockerfile"]);
        assert_eq!(plan(&sp, &d, &BTreeMap::new(), &settings(false)).expect("plan").secrets.len(), 2);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("gradio==4.0"), "gradio==4.0");
        assert_eq!(shell_quote("a b'c"), "'a b'\\''c'");
        assert_eq!(exec_form(&["a\"b".to_owned()]), "[\"a\\\"b\"]");
    }
}
