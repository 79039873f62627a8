//! Hand-written JSON schemas for values Kubernetes' structural schemas cannot express
//! with a plain type: "a number or `auto`" and "a boolean or `auto`".

use schemars::{Schema, json_schema};

/// An integer ≥ 0 or the string `auto`, as an int-or-string field checked by CEL.
pub fn int_or_auto(description: &str) -> Schema {
    json_schema!({
        "description": description,
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "enum": ["auto"]}],
        "x-kubernetes-validations": [{
            "rule": "type(self) == int ? self >= 0 : self == 'auto'",
            "message": "must be a step count or `auto`"
        }]
    })
}

/// `true`, `false` or `auto`. Structural schemas have no bool-or-string type, so the
/// field keeps whatever value it is given and a CEL rule checks it.
pub fn bool_or_auto(description: &str) -> Schema {
    json_schema!({
        "description": description,
        "x-kubernetes-preserve-unknown-fields": true,
        "x-kubernetes-validations": [{
            "rule": "type(self) == bool || (type(self) == string && self == 'auto')",
            "message": "must be true, false or `auto`"
        }]
    })
}
