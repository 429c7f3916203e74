//! Which Space serves a host name that two Spaces share.
//!
//! `{owner}-{name}.{domain}` is not injective: (`acme`, `corp-app`) and
//! (`acme-corp`, `app`) both map to `acme-corp-app.{domain}`. A new Space must
//! never take the host of an existing one (and with it its visitors, cookies
//! and tokens), so the **older** Space keeps it: the lower `since` (creation
//! time in a cluster, the order Spaces were given in locally); the same
//! `since`, or none known, is decided by namespace then name, so every
//! component decides alike. The other Space keeps its path route only.
//!
//! One rule for the proxy (which routes) and the operator (which tells the
//! other Space why it has no host), so the two always agree.

use std::cmp::Ordering;
use std::iter;

use super::Space;

/// One Space's claim on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Lower is older: creation time (Unix seconds) in a cluster, the
    /// position in the order given locally. `None`: after every known one.
    pub since: Option<i64>,
}

impl<'a> Claim<'a> {
    pub fn new(namespace: &'a str, name: &'a str, since: Option<i64>) -> Self {
        Self { namespace, name, since }
    }

    /// A Space's claim in a cluster: its creation time decides.
    pub fn of(space: &'a Space) -> Self {
        let meta = &space.metadata;
        Self {
            namespace: meta.namespace.as_deref().unwrap_or_default(),
            name: meta.name.as_deref().unwrap_or_default(),
            since: meta.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        }
    }

    /// Whether both Spaces' hosts are the same name (DNS names ignore ASCII
    /// case), without building either.
    pub fn same_host(&self, other: &Claim<'_>) -> bool {
        fn bytes<'c>(c: &Claim<'c>) -> impl Iterator<Item = u8> + 'c {
            let (ns, name) = (c.namespace.as_bytes(), c.name.as_bytes());
            ns.iter().chain(iter::once(&b'-')).chain(name.iter()).copied()
        }
        self.namespace.len() + self.name.len() == other.namespace.len() + other.name.len()
            && bytes(self).zip(bytes(other)).all(|(a, b)| a.eq_ignore_ascii_case(&b))
    }

    /// Whether this Space is the same one as `other`.
    pub fn is(&self, other: &Claim<'_>) -> bool {
        self.namespace == other.namespace && self.name == other.name
    }

    /// The order in which Spaces sharing a host get it: the first keeps it.
    pub fn precedence(&self, other: &Claim<'_>) -> Ordering {
        (self.since.unwrap_or(i64::MAX), self.namespace, self.name).cmp(&(
            other.since.unwrap_or(i64::MAX),
            other.namespace,
            other.name,
        ))
    }

    /// Whether this Space keeps a host it shares with `other`.
    pub fn outranks(&self, other: &Claim<'_>) -> bool {
        self.precedence(other) == Ordering::Less
    }
}

/// The Space that holds `me`'s host, when that is another Space: the first
/// by [`Claim::precedence`] among those sharing it. `None`: `me` holds it.
pub fn holder<'a>(me: &Claim<'_>, others: impl IntoIterator<Item = Claim<'a>>) -> Option<Claim<'a>> {
    others.into_iter().filter(|o| !o.is(me) && o.same_host(me) && o.outranks(me)).min_by(|a, b| a.precedence(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_compare_as_dns_names() {
        let a = Claim::new("acme", "corp-app", None);
        let b = Claim::new("acme-corp", "app", None);
        assert!(a.same_host(&b) && b.same_host(&a));
        assert!(a.same_host(&Claim::new("ACME-Corp", "App", None)));
        assert!(!a.same_host(&Claim::new("acme", "corp-apq", None)));
        assert!(!a.same_host(&Claim::new("acme", "corp-ap", None)));
        assert!(!a.same_host(&Claim::new("acmecorp", "-app", None)), "acmecorp--app");
    }

    #[test]
    fn the_older_space_keeps_the_host_in_either_creation_order() {
        let victim = Claim::new("acme", "corp-app", Some(100));
        let newcomer = Claim::new("acme-corp", "app", Some(200));
        assert_eq!(holder(&newcomer, [victim]), Some(victim));
        assert_eq!(holder(&victim, [newcomer]), None);
        // The other creation order: now `acme-corp/app` is the older one.
        let victim = Claim::new("acme-corp", "app", Some(100));
        let newcomer = Claim::new("acme", "corp-app", Some(200));
        assert_eq!(holder(&newcomer, [victim]), Some(victim));
        assert_eq!(holder(&victim, [newcomer]), None);
    }

    #[test]
    fn ties_and_unknown_times_are_decided_by_key() {
        let a = Claim::new("acme", "corp-app", Some(100));
        let b = Claim::new("acme-corp", "app", Some(100));
        assert_eq!(holder(&b, [a]), Some(a), "same second: by namespace");
        assert_eq!(holder(&a, [b]), None);
        let known = Claim::new("acme-corp", "app", Some(5));
        let unknown = Claim::new("acme", "corp-app", None);
        assert_eq!(holder(&unknown, [known]), Some(known), "a known time is older than none");
    }

    #[test]
    fn three_way_collisions_name_the_first() {
        let first = Claim::new("a-b", "c-d", Some(1));
        let second = Claim::new("a", "b-c-d", Some(2));
        let third = Claim::new("a-b-c", "d", Some(3));
        assert_eq!(holder(&third, [second, first, third]), Some(first));
        assert_eq!(holder(&second, [third, first]), Some(first));
        assert_eq!(holder(&first, [second, third, Claim::new("x", "y", Some(0))]), None);
    }
}
