//! Exactly the permissions the operator's code uses, as (API group, resource, verbs).
//! The Helm chart's roles are tested against these lists, and the lifecycle tests record
//! every API call reconcile makes and check it against them.

pub struct PolicyRule {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// What reconcile and the controller's watches do in a watched namespace. Never Secrets:
/// credentials reach the trainer by `secretKeyRef`.
pub const RULES: &[PolicyRule] = &[
    PolicyRule {
        api_group: "dreambooth.dev",
        resource: "dreamboothsessions",
        // list/watch: the controller; list: --max-running-sessions; delete: the TTL.
        verbs: &["list", "watch", "delete"],
    },
    PolicyRule {
        api_group: "dreambooth.dev",
        resource: "dreamboothsessions/status",
        verbs: &["patch"],
    },
    PolicyRule {
        api_group: "batch",
        resource: "jobs",
        // create + patch: server-side apply of a new Job; patch: suspend; delete: deadline.
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    PolicyRule {
        api_group: "",
        resource: "configmaps",
        verbs: &["create", "patch"],
    },
    PolicyRule {
        api_group: "",
        resource: "pods",
        // The trainer's IP for /progress and its termination message.
        verbs: &["list"],
    },
    PolicyRule {
        api_group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

/// Leader election, in the operator's own namespace only.
pub const LEADER_ELECTION_RULES: &[PolicyRule] = &[PolicyRule {
    api_group: "coordination.k8s.io",
    resource: "leases",
    verbs: &["get", "create", "patch"],
}];

/// Whether `rules` grant `verb` on `resource` of `api_group`.
pub fn allows(rules: &[PolicyRule], api_group: &str, resource: &str, verb: &str) -> bool {
    rules
        .iter()
        .any(|r| r.api_group == api_group && r.resource == resource && r.verbs.contains(&verb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_secrets_nor_wildcards() {
        for rule in RULES.iter().chain(LEADER_ELECTION_RULES) {
            assert_ne!(rule.resource, "secrets");
            assert_ne!(rule.resource, "*");
            assert!(!rule.verbs.contains(&"*"));
        }
        assert!(allows(RULES, "batch", "jobs", "create"));
        assert!(!allows(RULES, "", "pods", "delete"));
    }
}
