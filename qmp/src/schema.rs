//! Argument checking the way QEMU's QObject input visitor checks: members in
//! schema order (missing, then wrong type), then members the schema does not
//! have; with QEMU's wording and its names for nested members
//! (`capabilities[0].state`). Typed decoding runs only after this passed, so
//! a client sees QEMU's messages rather than serde's.

use serde_json::{Map, Value};

use crate::error::QmpError;

/// The type of an argument member.
#[derive(Clone, Copy, Debug)]
pub enum Ty {
    Str,
    Bool,
    /// `int` (int64).
    Int,
    /// `uint64` and `size`; unlike QEMU, which accepts a negative number
    /// here and wraps it, a negative number is refused.
    Uint64,
    /// One of these strings.
    Enum(&'static [&'static str]),
    List(&'static Ty),
    Object(&'static [Member]),
}

/// A member of an argument object.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub name: &'static str,
    pub ty: Ty,
    pub optional: bool,
}

impl Member {
    pub const fn required(name: &'static str, ty: Ty) -> Member {
        Member { name, ty, optional: false }
    }

    pub const fn optional(name: &'static str, ty: Ty) -> Member {
        Member { name, ty, optional: true }
    }
}

/// Checks a command's `arguments` object against its members.
pub fn check_arguments(members: &[Member], args: &Map<String, Value>) -> Result<(), QmpError> {
    check_object(members, args, "")
}

fn check_object(members: &[Member], map: &Map<String, Value>, prefix: &str) -> Result<(), QmpError> {
    for member in members {
        let full = format!("{prefix}{}", member.name);
        match map.get(member.name) {
            None if member.optional => {}
            None => return Err(QmpError::missing_parameter(&full)),
            Some(value) => check_value(&member.ty, value, &full, Some(member.name))?,
        }
    }
    if let Some(extra) = map.keys().find(|key| !members.iter().any(|m| m.name == key.as_str())) {
        return Err(QmpError::unexpected_parameter(&format!("{prefix}{extra}")));
    }
    Ok(())
}

/// `name` is the bare member name QEMU's enum check prints (`None` for a
/// list element, which QEMU prints as `null`).
fn check_value(ty: &Ty, value: &Value, full: &str, name: Option<&str>) -> Result<(), QmpError> {
    match ty {
        Ty::Str if value.is_string() => Ok(()),
        Ty::Str => Err(QmpError::invalid_parameter_type(full, "string")),
        Ty::Bool if value.is_boolean() => Ok(()),
        Ty::Bool => Err(QmpError::invalid_parameter_type(full, "boolean")),
        Ty::Int if value.is_i64() => Ok(()),
        Ty::Int => Err(QmpError::invalid_parameter_type(full, "integer")),
        Ty::Uint64 if value.is_u64() => Ok(()),
        Ty::Uint64 => Err(QmpError::invalid_parameter_value(full, "uint64")),
        Ty::Enum(values) => match value.as_str() {
            None => Err(QmpError::invalid_parameter_type(full, "string")),
            Some(s) if values.contains(&s) => Ok(()),
            Some(s) => Err(QmpError::enum_value(name.unwrap_or("null"), s)),
        },
        Ty::List(element) => {
            let Some(items) = value.as_array() else {
                return Err(QmpError::invalid_parameter_type(full, "array"));
            };
            for (index, item) in items.iter().enumerate() {
                check_value(element, item, &format!("{full}[{index}]"), None)?;
            }
            Ok(())
        }
        Ty::Object(members) => {
            let Some(map) = value.as_object() else {
                return Err(QmpError::invalid_parameter_type(full, "object"));
            };
            check_object(members, map, &format!("{full}."))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const STATUS: Ty = Ty::Object(&[
        Member::required("capability", Ty::Enum(&["events", "postcopy-ram"])),
        Member::required("state", Ty::Bool),
    ]);
    const ARGS: &[Member] = &[
        Member::required("capabilities", Ty::List(&STATUS)),
        Member::optional("speed", Ty::Uint64),
        Member::optional("uri", Ty::Str),
        Member::optional("delta", Ty::Int),
    ];

    fn check(args: Value) -> Result<(), String> {
        check_arguments(ARGS, args.as_object().unwrap()).map_err(|e| e.desc)
    }

    #[test]
    fn accepts_what_the_schema_has() {
        assert_eq!(check(json!({"capabilities": []})), Ok(()));
        let full =
            json!({"capabilities": [{"capability": "events", "state": true}], "speed": 5, "uri": "x", "delta": -3});
        assert_eq!(check(full), Ok(()));
    }

    #[test]
    fn errors_use_qemus_words_and_member_paths() {
        assert_eq!(check(json!({})), Err("Parameter 'capabilities' is missing".into()));
        assert_eq!(
            check(json!({"capabilities": {}})),
            Err("Invalid parameter type for 'capabilities', expected: array".into())
        );
        assert_eq!(
            check(json!({"capabilities": [7]})),
            Err("Invalid parameter type for 'capabilities[0]', expected: object".into())
        );
        assert_eq!(
            check(json!({"capabilities": [{"capability": "events"}]})),
            Err("Parameter 'capabilities[0].state' is missing".into())
        );
        assert_eq!(
            check(json!({"capabilities": [{"capability": "events", "state": "yes"}]})),
            Err("Invalid parameter type for 'capabilities[0].state', expected: boolean".into())
        );
        assert_eq!(
            check(json!({"capabilities": [{"capability": "nope", "state": true}]})),
            Err("Parameter 'capability' does not accept value 'nope'".into())
        );
        assert_eq!(
            check(json!({"capabilities": [{"capability": "events", "state": true, "x": 1}]})),
            Err("Parameter 'capabilities[0].x' is unexpected".into())
        );
        assert_eq!(check(json!({"capabilities": [], "speed": -1})), Err("Parameter 'speed' expects uint64".into()));
        assert_eq!(check(json!({"capabilities": [], "speed": 1.5})), Err("Parameter 'speed' expects uint64".into()));
        assert_eq!(
            check(json!({"capabilities": [], "uri": null})),
            Err("Invalid parameter type for 'uri', expected: string".into())
        );
        assert_eq!(
            check(json!({"capabilities": [], "delta": 1e30})),
            Err("Invalid parameter type for 'delta', expected: integer".into())
        );
        assert_eq!(check(json!({"capabilities": [], "bogus": 1})), Err("Parameter 'bogus' is unexpected".into()));
    }

    #[test]
    fn missing_and_wrong_types_come_before_unexpected_members() {
        assert_eq!(check(json!({"bogus": 1})), Err("Parameter 'capabilities' is missing".into()));
    }
}
