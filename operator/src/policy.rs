//! Namespace ownership policy: which Kafka topic names and consumer group ids each
//! namespace may own, as name prefixes. One operator serves many teams; without a policy
//! any namespace could declare an EventTopic or ConsumerGroup for another team's topic or
//! group. Pure: the reconcilers ask, nothing here reads the cluster.

use std::collections::BTreeMap;

/// The namespace key that stands for every namespace not listed by name.
pub const ANY_NAMESPACE: &str = "*";

/// Namespace → the name prefixes it may own. Empty means permissive: every namespace
/// may own every name (the default, so that a single-team install needs no setup).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    prefixes: BTreeMap<String, Vec<String>>,
}

/// One `NAMESPACE=PREFIX[,PREFIX...]` entry of `--namespace-prefixes`.
pub fn parse_entry(s: &str) -> Result<(String, Vec<String>), String> {
    let Some((ns, prefixes)) = s.split_once('=') else {
        return Err(format!(
            "expected NAMESPACE=PREFIX[,PREFIX...] (e.g. team-checkout=orders.,checkout.), got {s:?}"
        ));
    };
    let ns = ns.trim();
    if ns.is_empty() {
        return Err(format!(
            "{s:?} names no namespace: use NAMESPACE=PREFIX[,...], or *=PREFIX[,...] for every other namespace"
        ));
    }
    let prefixes: Vec<String> = prefixes
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    if let Some(open) = prefixes.iter().find(|p| !p.ends_with(SEPARATORS)) {
        return Err(format!(
            "prefix {open:?} of namespace {ns} does not end with '.', '-' or '_', so it would \
             also give away names such as {open}archive: end it with the separator your names \
             use ({open}. for {open}.order.placed)"
        ));
    }
    Ok((ns.to_string(), prefixes))
}

/// What a prefix must end with, so that `orders.` cannot also grant `ordersarchive.x`.
const SEPARATORS: [char; 3] = ['.', '-', '_'];

impl NamespacePolicy {
    /// A policy from `(namespace, prefixes)` entries; a namespace named twice gets the
    /// prefixes of both. The same prefix given to two namespaces is an error: a name
    /// would belong to both.
    pub fn new(entries: impl IntoIterator<Item = (String, Vec<String>)>) -> Result<Self, String> {
        let mut prefixes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for (ns, p) in entries {
            for prefix in &p {
                match owner.insert(prefix.clone(), ns.clone()) {
                    Some(first) if first != ns => {
                        return Err(format!(
                            "prefix {prefix:?} is given to both namespace {first} and \
                             namespace {ns}: give it to one (a longer prefix such as \
                             {prefix}eu. can go to the other)"
                        ));
                    }
                    _ => {}
                }
            }
            prefixes.entry(ns).or_default().extend(p);
        }
        Ok(Self { prefixes })
    }

    /// Whether every namespace may own every name.
    pub fn is_permissive(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The prefixes `namespace` may own: its own entry, or the `*` entry when it has
    /// none; `None` under a permissive policy (anything goes).
    pub fn prefixes_of(&self, namespace: &str) -> Option<&[String]> {
        if self.is_permissive() {
            return None;
        }
        let own = self
            .prefixes
            .get(namespace)
            .or_else(|| self.prefixes.get(ANY_NAMESPACE));
        Some(own.map_or(&[], Vec::as_slice))
    }

    /// `Ok` when `namespace` may own `name`; otherwise a message naming `field`, the
    /// name, the namespace and what the policy allows it. A name matching prefixes of
    /// several namespaces belongs to the one with the longest matching prefix, so a
    /// platform team can hand `orders.eu.` to one team inside another's `orders.`.
    pub fn check(&self, namespace: &str, field: &str, name: &str) -> Result<(), String> {
        let Some(mine) = self.prefixes_of(namespace) else {
            return Ok(());
        };
        let longest = |prefixes: &[String]| {
            prefixes
                .iter()
                .filter(|p| name.starts_with(p.as_str()))
                .map(String::len)
                .max()
        };
        let my_best = longest(mine);
        // A namespace not listed speaks for itself through `*`; a listed one competes
        // with `*` like with any other namespace.
        let mine_key = if self.prefixes.contains_key(namespace) {
            namespace
        } else {
            ANY_NAMESPACE
        };
        let other = self
            .prefixes
            .iter()
            .filter(|(ns, _)| ns.as_str() != mine_key)
            .filter_map(|(ns, p)| Some((longest(p)?, ns)))
            .max();
        match (my_best, other) {
            (Some(mine), Some((theirs, _))) if mine >= theirs => Ok(()),
            (Some(_), None) => Ok(()),
            (_, Some((_, owner))) if my_best.is_some() => Err(format!(
                "{field} {name:?} belongs to {} under the operator's namespace policy \
                 (a longer prefix of it is theirs): choose another {field}",
                if owner == ANY_NAMESPACE {
                    "every namespace not listed (*)".to_string()
                } else {
                    format!("namespace {owner}")
                }
            )),
            _ => Err(format!(
                "{field} {name:?} is outside what namespace {namespace} may own under the operator's \
                 namespace policy (--namespace-prefixes / chart value namespacePolicy): {}; choose \
                 such a {field}, or ask the operator's administrators to extend the policy",
                describe(mine)
            )),
        }
    }
}

fn describe(prefixes: &[String]) -> String {
    if prefixes.is_empty() {
        "no names at all".into()
    } else {
        let quoted: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
        format!("names starting with {}", quoted.join(" or "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> NamespacePolicy {
        NamespacePolicy::new(entries.iter().map(|e| parse_entry(e).unwrap())).unwrap()
    }

    #[test]
    fn no_entries_is_permissive() {
        let p = policy(&[]);
        assert!(p.is_permissive());
        assert_eq!(
            p.check("anyone", "spec.topicName", "billing.ledger.kept"),
            Ok(())
        );
    }

    #[test]
    fn a_namespace_owns_its_prefixes_and_nothing_else() {
        let p = policy(&["team-checkout=orders.,checkout.", "team-billing=billing."]);
        assert_eq!(
            p.check("team-checkout", "spec.topicName", "orders.order.placed"),
            Ok(())
        );
        assert_eq!(
            p.check("team-checkout", "spec.groupId", "checkout.worker"),
            Ok(())
        );
        let err = p
            .check("team-checkout", "spec.topicName", "billing.ledger.kept")
            .unwrap_err();
        assert!(
            err.contains("spec.topicName")
                && err.contains("billing.ledger.kept")
                && err.contains("team-checkout")
                && err.contains(r#""orders." or "checkout.""#),
            "{err}"
        );
        // A namespace the policy does not name owns nothing.
        let err = p.check("sandbox", "spec.groupId", "orders.x").unwrap_err();
        assert!(
            err.contains("no names at all") && err.contains("spec.groupId"),
            "{err}"
        );
    }

    #[test]
    fn star_covers_unlisted_namespaces_and_longest_prefix_wins() {
        let p = policy(&["*=sandbox.", "team-a=orders.", "team-b=orders.eu."]);
        assert_eq!(p.check("dev-1", "spec.topicName", "sandbox.t"), Ok(()));
        assert!(p.check("dev-1", "spec.topicName", "orders.t").is_err());
        assert_eq!(
            p.check("team-a", "spec.topicName", "orders.us.placed"),
            Ok(())
        );
        let err = p
            .check("team-a", "spec.topicName", "orders.eu.placed")
            .unwrap_err();
        assert!(err.contains("team-b"), "{err}");
        assert_eq!(
            p.check("team-b", "spec.topicName", "orders.eu.placed"),
            Ok(())
        );
    }

    #[test]
    fn a_listed_namespace_competes_with_star_for_longer_prefixes() {
        let p = policy(&["team-a=orders.", "*=orders.eu."]);
        let err = p
            .check("team-a", "spec.topicName", "orders.eu.placed")
            .unwrap_err();
        assert!(err.contains("not listed"), "{err}");
        assert_eq!(
            p.check("team-a", "spec.topicName", "orders.us.placed"),
            Ok(())
        );
        assert_eq!(
            p.check("dev-1", "spec.topicName", "orders.eu.placed"),
            Ok(())
        );
        assert!(
            p.check("dev-1", "spec.topicName", "orders.us.placed")
                .is_err()
        );
    }

    #[test]
    fn entries_are_parsed_strictly() {
        assert_eq!(
            parse_entry("team-a=orders., checkout.").unwrap(),
            ("team-a".into(), vec!["orders.".into(), "checkout.".into()])
        );
        assert!(
            parse_entry("team-a")
                .unwrap_err()
                .contains("NAMESPACE=PREFIX")
        );
        assert!(parse_entry("=orders.").is_err());
        // An empty list is allowed: that namespace owns nothing.
        assert_eq!(parse_entry("team-a=").unwrap().1, Vec::<String>::new());
        // "orders" would also grant "orders-archive" and "ordersx".
        let err = parse_entry("team-a=orders.,orders").unwrap_err();
        assert!(
            err.contains(r#""orders""#) && err.contains("orders."),
            "{err}"
        );
        for ok in ["team-a=orders.", "team-a=orders-", "team-a=orders_"] {
            assert!(parse_entry(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn one_prefix_belongs_to_one_namespace() {
        let entries =
            ["team-a=orders.", "team-b=billing.,orders."].map(|e| parse_entry(e).unwrap());
        let err = NamespacePolicy::new(entries).unwrap_err();
        assert!(
            err.contains(r#""orders.""#) && err.contains("team-a") && err.contains("team-b"),
            "{err}"
        );
        // The same namespace twice is fine, and so is a longer prefix for another.
        let entries = ["team-a=orders.", "team-a=orders.", "team-b=orders.eu."]
            .map(|e| parse_entry(e).unwrap());
        assert!(NamespacePolicy::new(entries).is_ok());
    }
}
