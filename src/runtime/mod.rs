//! Where Spaces run: Kubernetes workloads or local Docker containers, behind one trait.
