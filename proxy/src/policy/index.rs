//! Rule indexing: a policy written as many definitions of its decision
//! rule (`allow if { ... }`, one per grant) evaluates only the definitions
//! that can hold for the request.
//!
//! OPA indexes such rules; regorus evaluates every definition in turn,
//! about half a microsecond each on its virtual machine, so 100 grants cost
//! some 50 µs per decision. Here, when the policy is compiled, each
//! definition of the queried rule is read for the conditions in its body
//! that only a certain input can meet:
//!
//! - `input.<path> == <scalar>` (or `<scalar> == input.<path>`, or `=`),
//! - `input.<path> in {<scalar>, ...}` (a set or array of literals),
//! - `startswith(input.<path>, "<prefix>")`,
//!
//! where `<path>` is static (`input.attributes.request.http.method`,
//! `input.parsed_path[0]` is not; `input.attributes.source["principal"]`
//! is), also through an import of `input` (`import
//! input.attributes.request.http as http_request`). A condition under
//! `not`, one with a `with` modifier, or on a name the body declares again
//! is not read. Each definition is also copied, under a name of its own,
//! into the program regorus's virtual machine runs, as one more entry
//! point. A decision reads the few input values the conditions name (from
//! the request itself where it can, as the decision cache reads its key,
//! without building the input document), skips every definition one of
//! whose conditions fails, and runs the
//! copies of the others in order until one holds; a definition whose body
//! is nothing but such conditions holds when they pass, and is not run.
//! When none holds, the rule's default is the answer.
//!
//! That is sound under these conditions, checked here or the policy gets
//! no index: the query names the rule itself; every definition is a
//! complete rule whose value is `true` (so definitions never conflict and
//! the first that holds decides); none has an `else`; there is a
//! `default`; and a condition is a literal of the body itself, which the
//! definition cannot hold without. A copy that errs, or an input whose
//! value is of a type the condition does not test (a `startswith` on a
//! number), leaves the decision to the whole policy's evaluation.

use std::collections::{BTreeMap, HashMap};

use regorus::Value;
use regorus::rvm::RegoVM;
use regorus::unstable::{
    AssignOp, BoolOp, Expr, Literal, LiteralStmt, Module as Ast, Parser, Ref, Rule, RuleHead,
};

use super::cache::CachePath;

/// The name copies of definitions get, followed by their number.
const COPY_PREFIX: &str = "__weft_index_";

/// What one condition requires of an input value.
#[derive(Debug, Clone, PartialEq)]
enum Test {
    Equals(Value),
    /// `input.<path> in {...}` (or `[...]`): one of these.
    OneOf(Vec<Value>),
    StartsWith(String),
}

/// A condition of a definition: the value at one of the index's paths
/// passes a test.
#[derive(Debug, Clone, PartialEq)]
struct Condition {
    path: usize,
    test: Test,
}

/// One definition of the decision rule, as the index sees it.
#[derive(Debug)]
struct Definition {
    /// What the input must be for it to hold.
    conditions: Vec<Condition>,
    /// Whether the conditions are its whole body, so that it holds exactly
    /// when they pass and need not be run.
    whole: bool,
}

/// The definitions an equality condition on one path leaves, by the
/// value there: a set of definitions (bit `i`: definition `i`) for each
/// value some definition requires, and the definitions with no equality
/// condition on the path, which any value leaves.
#[derive(Debug)]
struct ByValue {
    path: usize,
    requiring: BTreeMap<Value, Vec<u64>>,
    free: Vec<u64>,
}

/// The index of one policy's decision rule.
#[derive(Debug)]
pub(crate) struct RuleIndex {
    /// The input paths the conditions read.
    paths: Vec<CachePath>,
    /// For each path some definition requires a value at: which
    /// definitions each value there leaves.
    by_value: Vec<ByValue>,
    /// The definitions, in the order they are tried; definition `i` is the
    /// program's entry point `i + 1`.
    definitions: Vec<Definition>,
    /// The rule's default: the decision when no definition holds.
    default: Value,
}

/// An index and what the virtual machine needs to use it: the modules
/// with each definition's copy added, and the copies' rule paths.
pub(crate) struct Indexed {
    pub(crate) index: RuleIndex,
    /// `(name, text)` of every module, in the order they were given.
    pub(crate) modules: Vec<(String, String)>,
    /// The copies' rule paths, the program's entry points after the query.
    pub(crate) entry_points: Vec<String>,
}

impl RuleIndex {
    /// The index for `query` over the parsed `modules`, when the policy
    /// qualifies and at least one definition has a condition.
    pub(crate) fn build(modules: &[Ref<Ast>], query: &str) -> Option<Indexed> {
        let mut components: Vec<&str> = query.split('.').collect();
        if components.len() < 3 || components.first() != Some(&"data") {
            return None;
        }
        if !components.iter().all(|c| is_identifier(c)) {
            return None;
        }
        let rule = components.pop()?;
        let package = &components[1..];
        // A name of the policy's own among the copies' would change its
        // meaning.
        if modules.iter().any(|m| {
            m.package
                .refr
                .span()
                .source
                .contents()
                .contains(COPY_PREFIX)
        }) {
            return None;
        }

        let mut paths = Vec::new();
        let mut definitions = Vec::new();
        let mut default = None;
        let mut texts = Vec::new();
        let mut entry_points = Vec::new();
        for module in modules {
            let source = module.package.refr.span().source.clone();
            let mut text = source.contents().clone();
            let names = Parser::get_path_ref_components(&module.package.refr).ok()?;
            let names: Vec<&str> = names.iter().map(|s| s.text()).collect();
            let names = names.strip_prefix(&["data"][..]).unwrap_or(&names[..]);
            if names != package {
                texts.push((source.file().clone(), text));
                continue;
            }
            let aliases = input_aliases(module)?;
            // A rule of the policy's own named `startswith` would not be
            // the builtin the index reads it as.
            if module.policy.iter().any(|rule| match &**rule {
                Rule::Spec { head, .. } => head_names(head, "startswith") != Some(false),
                Rule::Default { refr, .. } => refr.span().text() == "startswith",
            }) {
                return None;
            }
            let mut copies = String::new();
            for definition in &module.policy {
                match &**definition {
                    Rule::Default {
                        refr, args, value, ..
                    } if refr.span().text() == rule => {
                        if !args.is_empty() {
                            return None;
                        }
                        default = Some(scalar(value)?);
                    }
                    Rule::Default { .. } => {}
                    Rule::Spec { span, head, bodies } => {
                        let RuleHead::Compr { refr, assign, .. } = head else {
                            if head_names(head, rule)? {
                                return None;
                            }
                            continue;
                        };
                        let name = refr.span().text();
                        if name != rule {
                            if head_names(head, rule)? {
                                return None;
                            }
                            continue;
                        }
                        if let Some(assign) = assign
                            && scalar(&assign.value) != Some(Value::Bool(true))
                        {
                            return None;
                        }
                        if bodies.iter().any(|b| b.is_else || b.assign.is_some()) {
                            return None;
                        }
                        let mut conditions = Vec::new();
                        let mut whole = false;
                        if let [body] = &bodies[..] {
                            whole = true;
                            for stmt in &body.query.stmts {
                                let Some(((_, path), test)) = condition(stmt, &aliases)
                                    .filter(|((name, _), _)| !declares(&body.query.stmts, name))
                                else {
                                    whole = false;
                                    continue;
                                };
                                let path = position(&mut paths, path);
                                conditions.push(Condition { path, test });
                            }
                        }
                        let rest = span.text().strip_prefix(name)?;
                        let copy = format!("{COPY_PREFIX}{}", definitions.len());
                        entry_points.push(format!("data.{}.{copy}", package.join(".")));
                        copies.push('\n');
                        copies.push_str(&copy);
                        copies.push_str(rest);
                        copies.push('\n');
                        definitions.push(Definition { conditions, whole });
                    }
                }
            }
            text.push_str(&copies);
            texts.push((source.file().clone(), text));
        }
        let default = default?;
        if definitions.iter().all(|d| d.conditions.is_empty()) {
            return None;
        }
        let by_value = by_value(&definitions, paths.len());
        Some(Indexed {
            index: RuleIndex {
                paths,
                by_value,
                definitions,
                default,
            },
            modules: texts,
            entry_points,
        })
    }

    /// Whether every definition is decided by its conditions alone, so
    /// that no decision runs the policy (unless a value's type is one the
    /// conditions do not test).
    pub(crate) fn decides_alone(&self) -> bool {
        self.definitions.iter().all(|d| d.whole)
    }

    /// How many definitions the index holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.definitions.len()
    }

    /// The input paths the conditions read: [`RuleIndex::plan`] takes the
    /// values there, in this order.
    pub(crate) fn paths(&self) -> &[CachePath] {
        &self.paths
    }

    /// What decides, given the input's `values` at [`RuleIndex::paths`]
    /// (`Undefined` where it has none): the answer itself, or the
    /// definitions to run, in order; `None` when a value is of a type the
    /// conditions do not test, and the whole policy decides.
    ///
    /// A definition that is all conditions, and holds, decides: every
    /// definition's value is `true`, so which one holds first does not
    /// matter.
    pub(crate) fn plan(&self, values: &[Value]) -> Option<Plan> {
        // The definitions every required value leaves, then each of those
        // checked in order.
        let mut left = vec![u64::MAX; self.definitions.len().div_ceil(64)];
        for index in &self.by_value {
            let requiring = index.requiring.get(&values[index.path]);
            for (word, left) in left.iter_mut().enumerate() {
                *left &= index.free[word] | requiring.map_or(0, |r| r[word]);
            }
        }
        let mut run = Vec::new();
        for number in (0..self.definitions.len()).filter(|n| left[n / 64] & (1 << (n % 64)) != 0) {
            let definition = &self.definitions[number];
            if !can_hold(&definition.conditions, values)? {
                continue;
            }
            if definition.whole {
                return Some(Plan::Decided(Value::Bool(true)));
            }
            run.push(number);
        }
        if run.is_empty() {
            return Some(Plan::Decided(self.default.clone()));
        }
        Some(Plan::Run(run))
    }

    /// Runs the `candidates`' copies on `vm` (its input set) until one
    /// holds; `None` leaves the decision to the whole policy.
    pub(crate) fn run(&self, vm: &mut RegoVM, candidates: &[usize]) -> Option<Value> {
        for &number in candidates {
            match vm.execute_entry_point_by_index(number + 1) {
                Ok(Value::Undefined) => continue,
                Ok(Value::Bool(true)) => return Some(Value::Bool(true)),
                _ => return None,
            }
        }
        Some(self.default.clone())
    }

    /// The definitions that can hold for `input`, by number.
    #[cfg(test)]
    pub(crate) fn candidates(&self, input: &Value) -> Option<Vec<usize>> {
        let values: Vec<Value> = self
            .paths
            .iter()
            .map(|path| super::descend(input, &path.path))
            .collect();
        let mut out = Vec::new();
        for (number, definition) in self.definitions.iter().enumerate() {
            if can_hold(&definition.conditions, &values)? {
                out.push(number);
            }
        }
        Some(out)
    }

    /// Whether definition `number` is decided by its conditions alone.
    #[cfg(test)]
    pub(crate) fn whole(&self, number: usize) -> bool {
        self.definitions[number].whole
    }
}

/// The definitions each required value leaves, for every path a value is
/// required at.
fn by_value(definitions: &[Definition], paths: usize) -> Vec<ByValue> {
    let words = definitions.len().div_ceil(64);
    let mut out = Vec::new();
    for path in 0..paths {
        let mut index = ByValue {
            path,
            requiring: BTreeMap::new(),
            free: vec![0; words],
        };
        for (number, definition) in definitions.iter().enumerate() {
            let bit = 1u64 << (number % 64);
            let mut required = definition
                .conditions
                .iter()
                .filter(|c| c.path == path)
                .flat_map(|c| match &c.test {
                    Test::Equals(value) => std::slice::from_ref(value),
                    Test::OneOf(values) => &values[..],
                    Test::StartsWith(_) => &[][..],
                })
                .peekable();
            if required.peek().is_none() {
                index.free[number / 64] |= bit;
            }
            // Each value any condition allows leaves the definition, which
            // is then checked against all of them (two conditions that
            // allow different values leave it for either, and it fails).
            for value in required {
                index
                    .requiring
                    .entry(value.clone())
                    .or_insert_with(|| vec![0; words])[number / 64] |= bit;
            }
        }
        if !index.requiring.is_empty() {
            out.push(index);
        }
    }
    out
}

/// What decides a request, by the index.
#[derive(Debug, PartialEq)]
pub(crate) enum Plan {
    /// The decision, with nothing run.
    Decided(Value),
    /// These definitions, run in order until one holds.
    Run(Vec<usize>),
}

/// Whether a definition with `conditions` can hold, given the `values`
/// at the index's paths (`None`: a type no condition tests).
fn can_hold(conditions: &[Condition], values: &[Value]) -> Option<bool> {
    for condition in conditions {
        if !condition.test.passes(&values[condition.path])? {
            return Some(false);
        }
    }
    Some(true)
}

impl Test {
    /// Whether `value` passes; `None` when the test cannot tell (a type
    /// its builtin would refuse).
    fn passes(&self, value: &Value) -> Option<bool> {
        if matches!(value, Value::Undefined) {
            // An undefined operand makes the condition undefined.
            return Some(false);
        }
        match self {
            Test::Equals(expected) => Some(value == expected),
            Test::OneOf(expected) => Some(expected.contains(value)),
            Test::StartsWith(prefix) => match value {
                Value::String(text) => Some(text.starts_with(prefix.as_str())),
                _ => None,
            },
        }
    }
}

/// The index of `path` in `paths`, added when new.
fn position(paths: &mut Vec<CachePath>, path: Vec<Value>) -> usize {
    if let Some(found) = paths.iter().position(|p| p.path == path) {
        return found;
    }
    paths.push(CachePath::new(path));
    paths.len() - 1
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !text.as_bytes()[0].is_ascii_digit()
}

/// Whether a head that is not `rule` itself still defines part of it
/// (`rule.x`, `rule[k]`, `rule contains x`, `rule(x)`): such a policy gets
/// no index. `None` when the head cannot be read.
fn head_names(head: &RuleHead, rule: &str) -> Option<bool> {
    let refr = match head {
        RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } | RuleHead::Func { refr, .. } => {
            refr
        }
    };
    let components = Parser::get_path_ref_components(refr).ok()?;
    Some(components.first().map(|c| c.text()) == Some(rule))
}

/// The names that stand for a part of `input` in `module`: `input` itself
/// and each import of it, with the path each one starts at.
fn input_aliases(module: &Ast) -> Option<HashMap<String, Vec<Value>>> {
    let mut aliases = HashMap::from([("input".to_owned(), Vec::new())]);
    for import in &module.imports {
        let components = Parser::get_path_ref_components(&import.refr).ok()?;
        let mut names = components.iter().map(|c| c.text());
        if names.next() != Some("input") {
            continue;
        }
        let path: Vec<Value> = names.map(Value::from).collect();
        let alias = match &import.r#as {
            Some(alias) => alias.text().to_owned(),
            None => components.last()?.text().to_owned(),
        };
        aliases.insert(alias, path);
    }
    Some(aliases)
}

/// The condition a body's statement puts on the input, with the name it
/// reads the input through.
fn condition(
    stmt: &LiteralStmt,
    aliases: &HashMap<String, Vec<Value>>,
) -> Option<((String, Vec<Value>), Test)> {
    if !stmt.with_mods.is_empty() {
        return None;
    }
    let Literal::Expr { expr, .. } = &stmt.literal else {
        return None;
    };
    match &**expr {
        Expr::BoolExpr {
            op: BoolOp::Eq,
            lhs,
            rhs,
            ..
        }
        | Expr::AssignExpr {
            op: AssignOp::Eq,
            lhs,
            rhs,
            ..
        } => {
            if let (Some(path), Some(value)) = (input_path(lhs, aliases), scalar(rhs)) {
                return Some((path, Test::Equals(value)));
            }
            let (path, value) = (input_path(rhs, aliases)?, scalar(lhs)?);
            Some((path, Test::Equals(value)))
        }
        Expr::Membership {
            key: None,
            value,
            collection,
            ..
        } => {
            let path = input_path(value, aliases)?;
            let items = match &**collection {
                Expr::Set { items, .. } | Expr::Array { items, .. } => items,
                _ => return None,
            };
            let values: Option<Vec<Value>> = items.iter().map(scalar).collect();
            Some((path, Test::OneOf(values?)))
        }
        Expr::Call { fcn, params, .. } => {
            if !matches!(&**fcn, Expr::Var { span, .. } if span.text() == "startswith") {
                return None;
            }
            let [subject, prefix] = &params[..] else {
                return None;
            };
            let path = input_path(subject, aliases)?;
            match scalar(prefix)? {
                Value::String(prefix) => Some((path, Test::StartsWith(prefix.to_string()))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A static path into the input (`input.a.b`, `alias["c"]`): the name it
/// starts from and the path from the input's root.
fn input_path(
    expr: &Ref<Expr>,
    aliases: &HashMap<String, Vec<Value>>,
) -> Option<(String, Vec<Value>)> {
    match &**expr {
        Expr::Var { span, .. } => {
            let name = span.text();
            Some((name.to_owned(), aliases.get(name)?.clone()))
        }
        Expr::RefDot { refr, field, .. } => {
            let (name, mut path) = input_path(refr, aliases)?;
            path.push(field.1.clone());
            Some((name, path))
        }
        Expr::RefBrack { refr, index, .. } => {
            let key = match &**index {
                Expr::String { value, .. } | Expr::RawString { value, .. } => value.clone(),
                _ => return None,
            };
            let (name, mut path) = input_path(refr, aliases)?;
            path.push(key);
            Some((name, path))
        }
        _ => None,
    }
}

/// A literal scalar's value.
fn scalar(expr: &Ref<Expr>) -> Option<Value> {
    match &**expr {
        Expr::String { value, .. }
        | Expr::RawString { value, .. }
        | Expr::Number { value, .. }
        | Expr::Bool { value, .. }
        | Expr::Null { value, .. } => Some(value.clone()),
        _ => None,
    }
}

/// Whether the body declares `name` itself (`some name`, `name := ...`,
/// `some name in ...`, `every name in ...`), so that a condition through
/// it may not read the input.
fn declares(stmts: &[LiteralStmt], name: &str) -> bool {
    let is = |expr: &Ref<Expr>| matches!(&**expr, Expr::Var { span, .. } if span.text() == name);
    stmts.iter().any(|stmt| match &stmt.literal {
        Literal::SomeVars { vars, .. } => vars.iter().any(|v| v.text() == name),
        Literal::SomeIn { key, value, .. } => key.as_ref().is_some_and(is) || is(value),
        Literal::Every { key, value, .. } => {
            key.as_ref().is_some_and(|k| k.text() == name) || value.text() == name
        }
        Literal::Expr { expr, .. } => match &**expr {
            Expr::AssignExpr { lhs, .. } => is(lhs),
            _ => false,
        },
        Literal::NotExpr { .. } => false,
    })
}
