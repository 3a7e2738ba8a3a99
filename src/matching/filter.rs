//! Subscription filters: a conjunction of simple predicates on dotted paths of the event JSON.
//!
//! ```yaml
//! filter:
//!   data.country: DE                     # equality (numbers compare by value: 1 == 1.0)
//!   data.status: {in: [paid, shipped]}   # one of
//!   data.coupon: {exists: true}          # present (or absent with false)
//!   data.shape: {eq: {a: 1}}             # equality with an object
//! ```
//! For CloudEvents binary-mode records the JSON is `{id, type, source, subject, tenant, data}` built from the
//! headers, with `data` the parsed value (null when it is not JSON), so paths read the same in every encoding.

use std::collections::BTreeMap;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    Eq(Value),
    In(Vec<Value>),
    Exists(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    preds: Vec<(Vec<String>, Cond)>,
}

impl Filter {
    /// Compiles a filter; the error carries the offending path and a message.
    pub fn compile(spec: &BTreeMap<String, Value>) -> Result<Filter, (String, String)> {
        if spec.is_empty() {
            return Err((
                String::new(),
                "must have at least one condition when present".into(),
            ));
        }
        let mut preds = Vec::with_capacity(spec.len());
        for (path, v) in spec {
            let segs: Vec<String> = path.split('.').map(String::from).collect();
            if segs.iter().any(|s| s.is_empty()) || segs.len() > 16 {
                return Err((
                    path.clone(),
                    "is not a dotted path such as data.customer.country".into(),
                ));
            }
            let cond = match v {
                Value::Object(m) if m.len() == 1 && m.contains_key("in") => match &m["in"] {
                    Value::Array(a) if !a.is_empty() => Cond::In(a.clone()),
                    _ => return Err((path.clone(), "`in` needs a non-empty list".into())),
                },
                Value::Object(m) if m.len() == 1 && m.contains_key("exists") => match m["exists"] {
                    Value::Bool(b) => Cond::Exists(b),
                    _ => return Err((path.clone(), "`exists` needs true or false".into())),
                },
                Value::Object(m) if m.len() == 1 && m.contains_key("eq") => {
                    Cond::Eq(m["eq"].clone())
                }
                Value::Object(_) => {
                    return Err((
                        path.clone(),
                        "use a value, {in: [...]}, {exists: bool} or {eq: value}".into(),
                    ));
                }
                other => Cond::Eq(other.clone()),
            };
            preds.push((segs, cond));
        }
        Ok(Filter { preds })
    }

    pub fn matches(&self, doc: &Value) -> bool {
        self.preds.iter().all(|(path, cond)| {
            let found = lookup(doc, path);
            match cond {
                Cond::Exists(want) => found.is_some() == *want,
                Cond::Eq(v) => found.is_some_and(|f| json_eq(f, v)),
                Cond::In(vs) => found.is_some_and(|f| vs.iter().any(|v| json_eq(f, v))),
            }
        })
    }
}

fn lookup<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for seg in path {
        cur = cur.as_object()?.get(seg.as_str())?;
    }
    Some(cur)
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(y: &str) -> Result<Filter, (String, String)> {
        let m: BTreeMap<String, Value> = serde_yaml_ng::from_str(y).unwrap();
        Filter::compile(&m)
    }

    #[test]
    fn conditions() {
        let doc = json!({"data": {"country": "DE", "n": 1, "status": "paid", "o": {"a": 1}}});
        assert!(f("data.country: DE").unwrap().matches(&doc));
        assert!(!f("data.country: FR").unwrap().matches(&doc));
        assert!(f("data.n: 1.0").unwrap().matches(&doc));
        assert!(
            f("data.status: {in: [paid, shipped]}")
                .unwrap()
                .matches(&doc)
        );
        assert!(!f("data.status: {in: [shipped]}").unwrap().matches(&doc));
        assert!(f("data.coupon: {exists: false}").unwrap().matches(&doc));
        assert!(!f("data.coupon: {exists: true}").unwrap().matches(&doc));
        assert!(f("data.o: {eq: {a: 1}}").unwrap().matches(&doc));
        assert!(!f("data.country.x: DE").unwrap().matches(&doc));
        // Conjunction.
        assert!(f("{data.country: DE, data.n: 1}").unwrap().matches(&doc));
        assert!(!f("{data.country: DE, data.n: 2}").unwrap().matches(&doc));
        // Missing path never equals.
        assert!(!f("data.missing: null").unwrap().matches(&doc));
    }

    #[test]
    fn compile_errors_name_the_path() {
        assert_eq!(f("data..x: 1").unwrap_err().0, "data..x");
        assert_eq!(f("a: {in: []}").unwrap_err().0, "a");
        assert_eq!(f("a: {exists: 1}").unwrap_err().0, "a");
        assert_eq!(f("a: {gt: 1}").unwrap_err().0, "a");
        assert!(f("{}").is_err());
    }
}
