//! `hangar up`: Space manifests from a folder, the Docker runtime and the proxy in one process.
