//! Rego unit tests, as `opa test` runs them: every rule of a test module
//! whose name starts with `test_` must be true, evaluated against the
//! policy's own modules and data (tests set their input with `with`).

use super::{CompiledPolicy, Module};

/// One test rule's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    /// The rule's full path, e.g. `data.envoy.authz_test.test_get_allowed`.
    pub rule: String,
    /// `None` when it passed; otherwise why not (false, undefined, or an
    /// evaluation error).
    pub failure: Option<String>,
}

impl TestOutcome {
    /// Whether the rule was true.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// The names of the `test_*` rules a module defines: rule heads start a
/// line, as `opa fmt` writes them. A rule defined in several bodies is
/// one test.
fn test_rules(text: &str) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for line in text.lines() {
        if !line.starts_with("test_") {
            continue;
        }
        let end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(line.len());
        let name = &line[..end];
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

impl CompiledPolicy {
    /// Runs the `test_*` rules of `tests` against this policy. Errors when
    /// a test module does not parse or defines no test.
    pub fn run_tests(&self, tests: &[Module]) -> Result<Vec<TestOutcome>, String> {
        let mut engine = self.engine.clone();
        let mut outcomes = Vec::new();
        let mut rules = Vec::new();
        for module in tests {
            let package = engine
                .add_policy(module.name.clone(), module.text.clone())
                .map_err(|e| e.to_string())?;
            let found = test_rules(&module.text);
            if found.is_empty() {
                return Err(format!("{}: no test_* rules", module.name));
            }
            rules.extend(found.into_iter().map(|name| format!("{package}.{name}")));
        }
        engine.set_input(regorus::Value::new_object());
        for rule in rules {
            let failure = match engine.eval_rule(rule.clone()) {
                Ok(regorus::Value::Bool(true)) => None,
                Ok(regorus::Value::Undefined) => Some("undefined".to_owned()),
                Ok(value) => Some(format!("evaluated to {value}")),
                Err(error) => Some(error.to_string()),
            };
            outcomes.push(TestOutcome { rule, failure });
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FailureMode, Mode};
    use super::*;

    const POLICY: &str = "package envoy.authz\n\
        default allow := false\n\
        allow if input.attributes.request.http.method == \"GET\"\n";

    fn policy() -> CompiledPolicy {
        let modules = [Module {
            name: "authz.rego".into(),
            text: POLICY.into(),
        }];
        CompiledPolicy::compile(
            "authz",
            &modules,
            None,
            super::super::DEFAULT_QUERY,
            false,
            Mode::Enforce,
            FailureMode::Deny,
        )
        .unwrap()
    }

    fn module(text: &str) -> Module {
        Module {
            name: "authz_test.rego".into(),
            text: text.into(),
        }
    }

    #[test]
    fn passing_failing_and_erroring_tests_are_told_apart() {
        let tests = module(
            "package envoy.authz_test\n\
             import data.envoy.authz\n\
             test_get_allowed if authz.allow with input as {\"attributes\": {\"request\": {\"http\": {\"method\": \"GET\"}}}}\n\
             test_delete_allowed if authz.allow with input as {\"attributes\": {\"request\": {\"http\": {\"method\": \"DELETE\"}}}}\n\
             test_undefined if input.nothing\n",
        );
        let outcomes = policy().run_tests(&[tests]).unwrap();
        let by_rule: Vec<(&str, bool)> = outcomes
            .iter()
            .map(|o| (o.rule.as_str(), o.passed()))
            .collect();
        assert_eq!(
            by_rule,
            [
                ("data.envoy.authz_test.test_get_allowed", true),
                ("data.envoy.authz_test.test_delete_allowed", false),
                ("data.envoy.authz_test.test_undefined", false),
            ]
        );
    }

    #[test]
    fn a_broken_or_empty_test_module_is_an_error() {
        let error = policy()
            .run_tests(&[module("package t\ntest_x if {")])
            .unwrap_err();
        assert!(error.contains("authz_test.rego"), "{error}");
        let error = policy()
            .run_tests(&[module("package t\nallow := true\n")])
            .unwrap_err();
        assert!(error.contains("no test_* rules"), "{error}");
    }

    #[test]
    fn rule_heads_are_found_once_each() {
        let text =
            "package t\ntest_a if true\ntest_a if false\n  test_nested := 1\ntest_b := true\n";
        assert_eq!(test_rules(text), ["test_a", "test_b"]);
    }
}
