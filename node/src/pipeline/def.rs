//! Pipeline definitions: the data a pipeline is declared as (TOML or JSON), their validation with
//! clear errors, and the small template language that maps the event into a step's input.
//!
//! Not here: running them (`run.rs`) or keeping them (`mod.rs`).

use std::collections::BTreeMap;

use gearmesh_gears::{GearName, PortName, Strategy};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most steps in one pipeline.
pub const MAX_STEPS: usize = 64;
/// Longest pipeline or step name.
pub const MAX_NAME: usize = 64;

/// A pipeline as declared: a name and its steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDef {
    /// The pipeline's name (`[a-z0-9_-]`, at most 64 characters).
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The steps. Each runs after the step before it unless it says otherwise with `after`.
    pub steps: Vec<StepDef>,
}

/// One step: a port to call, how its input is made from the event, where its output goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// The step's name, unique in the pipeline.
    pub name: String,
    /// The port, as `gear/port`.
    pub call: String,
    /// The input: a JSON template where a string `"$"` is the whole event and `"$.a.b"` the
    /// value at that path; everything else is literal. Default: the whole event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// Where the reply goes in the event: under this key; without it, a reply that is an object
    /// is merged into the event's top level (other replies are dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The port that undoes this step, as `gear/port`, called when a later step fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<String>,
    /// The undo port's input template (evaluated against the event at compensation time).
    /// Default: the input this step was called with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_input: Option<Value>,
    /// Run the step only when the value at this path (`"$.a.b"`, or `"!$.a.b"` for the opposite)
    /// is present and not `null`, `false`, `0` or `""`; otherwise it is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// The steps this one waits for. Default: the step before it (none for the first). `[]`
    /// starts it with the pipeline; steps whose waits are met together run in parallel, and
    /// their outputs are merged in declaration order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
    /// The call's strategy (`local-first`, `spread`, `shard`, ...); default: the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// A timeout for this step in milliseconds (never past the run's deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A validated step, ready to run.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) def: StepDef,
    pub(crate) gear: String,
    pub(crate) port: String,
    pub(crate) undo: Option<(String, String)>,
    pub(crate) strategy: Option<Strategy>,
    /// Indexes of the steps it waits for.
    pub(crate) after: Vec<usize>,
}

/// A validated pipeline.
#[derive(Debug, Clone)]
pub(crate) struct Pipeline {
    pub(crate) def: PipelineDef,
    pub(crate) steps: Vec<Step>,
}

/// Parses a definition from TOML or JSON text (JSON when it starts with `{`).
///
/// # Errors
/// The parser's message.
pub fn parse(text: &str) -> Result<PipelineDef, String> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("invalid pipeline JSON: {e}"))
    } else {
        toml::from_str(text).map_err(|e| format!("invalid pipeline TOML: {}", e.to_string().trim()))
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn gear_port(s: &str) -> Result<(String, String), String> {
    let (g, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not gear/port"))?;
    GearName::new(g).map_err(|e| format!("{s:?}: {e}"))?;
    PortName::new(p).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((g.to_owned(), p.to_owned()))
}

/// A path `$` or `$.a.b` (segments non-empty); `None` if `s` is not a path.
fn path_of(s: &str) -> Option<Result<Vec<&str>, String>> {
    let rest = s.strip_prefix('$')?;
    if rest.is_empty() {
        return Some(Ok(Vec::new()));
    }
    let Some(rest) = rest.strip_prefix('.') else {
        return Some(Err(format!("{s:?}: a path is \"$\" or \"$.field.field\"")));
    };
    let segs: Vec<&str> = rest.split('.').collect();
    if segs.iter().any(|p| p.is_empty()) {
        return Some(Err(format!("{s:?}: empty field name in a path")));
    }
    Some(Ok(segs))
}

/// Every path in a template, checked.
fn check_template(v: &Value, errors: &mut Vec<String>, what: &str) {
    match v {
        Value::String(s) => {
            if let Some(Err(e)) = path_of(s) {
                errors.push(format!("{what}: {e}"));
            }
        }
        Value::Array(a) => a.iter().for_each(|x| check_template(x, errors, what)),
        Value::Object(o) => o.values().for_each(|x| check_template(x, errors, what)),
        _ => {}
    }
}

/// Checks a definition; every problem is reported, each naming its step.
///
/// # Errors
/// The list of problems.
pub(crate) fn validate(def: PipelineDef) -> Result<Pipeline, Vec<String>> {
    let mut errors = Vec::new();
    if !valid_name(&def.name) {
        errors.push(format!("name {:?}: use 1 to {MAX_NAME} of a-z, 0-9, _ and -", def.name));
    }
    if def.steps.is_empty() {
        errors.push("a pipeline needs at least one step".into());
    }
    if def.steps.len() > MAX_STEPS {
        errors.push(format!("{} steps: at most {MAX_STEPS}", def.steps.len()));
    }
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut steps = Vec::with_capacity(def.steps.len());
    for (i, s) in def.steps.iter().enumerate() {
        let at = format!("step {} ({})", i + 1, s.name);
        if !valid_name(&s.name) {
            errors.push(format!("{at}: name: use 1 to {MAX_NAME} of a-z, 0-9, _ and -"));
        }
        if index.contains_key(s.name.as_str()) {
            errors.push(format!("{at}: the name is used by an earlier step"));
        }
        let (gear, port) = gear_port(&s.call).unwrap_or_else(|e| {
            errors.push(format!("{at}: call {e}"));
            Default::default()
        });
        let undo = s.undo.as_deref().map(gear_port).transpose().unwrap_or_else(|e| {
            errors.push(format!("{at}: undo {e}"));
            None
        });
        if s.undo_input.is_some() && s.undo.is_none() {
            errors.push(format!("{at}: undo_input without undo"));
        }
        if let Some(t) = &s.input {
            check_template(t, &mut errors, &format!("{at}: input"));
        }
        if let Some(t) = &s.undo_input {
            check_template(t, &mut errors, &format!("{at}: undo_input"));
        }
        if let Some(w) = &s.when {
            match path_of(w.strip_prefix('!').unwrap_or(w)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => errors.push(format!("{at}: when {e}")),
                None => errors.push(format!("{at}: when {w:?} is not a path like \"$.field\"")),
            }
        }
        if let Some(o) = &s.output
            && (o.is_empty() || o.contains('.'))
        {
            errors.push(format!("{at}: output {o:?} must be a plain key"));
        }
        let strategy = s.strategy.as_deref().map(str::parse::<Strategy>).transpose().unwrap_or_else(|e| {
            errors.push(format!("{at}: strategy: {}", e.message()));
            None
        });
        if s.timeout_ms == Some(0) {
            errors.push(format!("{at}: timeout_ms must be greater than 0"));
        }
        let after = match &s.after {
            None => i.checked_sub(1).into_iter().collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| match index.get(n.as_str()) {
                    Some(j) => Some(*j),
                    None => {
                        errors.push(format!("{at}: after {n:?}: no earlier step has that name"));
                        None
                    }
                })
                .collect(),
        };
        index.insert(&s.name, i);
        steps.push(Step { def: s.clone(), gear, port, undo, strategy, after });
    }
    if errors.is_empty() { Ok(Pipeline { def, steps }) } else { Err(errors) }
}

// === templates ===

/// The value at `path` in `event`.
fn lookup<'a>(event: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(event, |v, seg| match v {
        Value::Object(o) => o.get(*seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// Fills a template from the event.
///
/// # Errors
/// A path that is not in the event.
pub(crate) fn render(template: &Value, event: &Value) -> Result<Value, String> {
    Ok(match template {
        Value::String(s) => match path_of(s) {
            Some(Ok(path)) => lookup(event, &path).cloned().ok_or_else(|| format!("{s} is not in the event"))?,
            Some(Err(e)) => return Err(e),
            None => template.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(|x| render(x, event)).collect::<Result<_, _>>()?),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, x)| Ok((k.clone(), render(x, event)?))).collect::<Result<_, String>>()?)
        }
        other => other.clone(),
    })
}

/// Whether a `when` condition holds for the event.
pub(crate) fn holds(when: &str, event: &Value) -> bool {
    let (negate, path) = match when.strip_prefix('!') {
        Some(p) => (true, p),
        None => (false, when),
    };
    let truthy = match path_of(path) {
        Some(Ok(p)) => match lookup(event, &p) {
            None | Some(Value::Null | Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        },
        _ => false,
    };
    truthy != negate
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn templates_fill_from_the_event() {
        let ev = json!({"user": {"id": "alice"}, "qty": 2, "items": [10, 20]});
        let t = json!({"id": "$.user.id", "n": "$.qty", "first": "$.items.0", "all": "$", "lit": "hello"});
        let got = render(&t, &ev).expect("rendered");
        assert_eq!(got, json!({"id": "alice", "n": 2, "first": 10, "all": ev, "lit": "hello"}));
        assert!(render(&json!("$.nope"), &ev).expect_err("missing").contains("$.nope"));
        assert!(holds("$.qty", &ev));
        assert!(!holds("$.missing", &ev));
        assert!(holds("!$.missing", &ev));
    }

    #[test]
    fn definitions_parse_from_toml_and_json_and_errors_name_the_step() {
        let toml = r#"
            name = "p"
            [[steps]]
            name = "a"
            call = "echo/echo"
            [[steps]]
            name = "b"
            call = "echo/echo"
            after = []
        "#;
        let p = validate(parse(toml).expect("toml")).expect("valid");
        assert_eq!(p.steps[1].after, Vec::<usize>::new());
        let json =
            r#"{"name": "p", "steps": [{"name": "a", "call": "echo/echo"}, {"name": "b", "call": "echo/echo"}]}"#;
        assert_eq!(validate(parse(json).expect("json")).expect("valid").steps[1].after, vec![0]);

        let bad = PipelineDef {
            name: "Bad Name".into(),
            description: None,
            steps: vec![
                StepDef { name: "a".into(), call: "nogear".into(), ..step() },
                StepDef { name: "a".into(), undo: Some("x/".into()), after: Some(vec!["zz".into()]), ..step() },
                StepDef { name: "c".into(), input: Some(json!({"x": "$..y"})), when: Some("qty".into()), ..step() },
                StepDef { name: "d".into(), strategy: Some("nearest".into()), output: Some("a.b".into()), ..step() },
            ],
        };
        let errors = validate(bad).expect_err("invalid");
        let all = errors.join("\n");
        for needle in [
            "name \"Bad Name\"",
            "step 1 (a): call \"nogear\" is not gear/port",
            "step 2 (a): the name is used by an earlier step",
            "step 2 (a): undo",
            "step 2 (a): after \"zz\"",
            "step 3 (c): input",
            "step 3 (c): when",
            "step 4 (d): strategy",
            "step 4 (d): output",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(parse("name = 1").expect_err("bad toml").contains("TOML"));
        assert!(parse(r#"{"name": "p", "steps": [], "extra": 1}"#).expect_err("unknown field").contains("extra"));
    }

    fn step() -> StepDef {
        StepDef {
            name: String::new(),
            call: "echo/echo".into(),
            input: None,
            output: None,
            undo: None,
            undo_input: None,
            when: None,
            after: None,
            strategy: None,
            timeout_ms: None,
        }
    }
}
