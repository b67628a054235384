//! A per-thread decision cache, for the policies where one is sound.
//!
//! A decision may be reused only when the policy is a function of what the
//! cache key holds. That is established from the Rego source, lexically
//! and conservatively: the policy qualifies when every use of `input` is a
//! static path (`input.attributes.request.http.method`,
//! `input.parsed_path`, `input.attributes.source["principal"]`), and it
//! calls nothing whose answer changes from one call to the next
//! (`time.now_ns`, `rand.*`, `uuid.*`, `http.send`, `io.jwt.decode_verify`
//! (which reads the clock), `opa.runtime`, `net.lookup_ip_addr`). A bare
//! `input`, a computed key at its root (`input[k]`), `import input` or
//! `with input` disqualify it. The key is the value at each such path of
//! the request's input (a path read with a computed key further down,
//! `input.attributes.request.http.headers[name]`, keys on the whole object
//! there). A key that would hold the request's id (`http.id`, all of
//! `http.headers`, or an object above them) never matches twice, so such a
//! policy gets no cache.
//!
//! The policy's data is part of the compiled policy, and each compilation
//! has its own cache, so a changed policy or data never meets an old
//! decision. Bounded: past [`MAX_ENTRIES`] per policy and thread, the
//! cache starts over.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use regorus::Value;

use super::{Module, Verdict, per_compilation};

/// Decisions kept per policy and worker thread.
pub(crate) const MAX_ENTRIES: usize = 4096;

/// Calls whose answer is not a function of their arguments.
const UNSTABLE: &[&str] = &[
    "time.now_ns",
    "rand.",
    "uuid.",
    "http.send",
    "io.jwt.decode_verify",
    "opa.runtime",
    "net.lookup_ip_addr",
];

/// The input paths the modules read, when every read is a static path and
/// nothing unstable is called; `None` when no cache would be sound.
pub(crate) fn input_paths(modules: &[Module]) -> Option<Vec<Vec<Value>>> {
    let mut paths: Vec<Vec<String>> = Vec::new();
    for module in modules {
        let code = code_only(&module.text);
        if UNSTABLE.iter().any(|call| code.contains(call)) {
            return None;
        }
        let bytes = code.as_bytes();
        let mut at = 0;
        while let Some(found) = code[at..].find("input") {
            let start = at + found;
            let end = start + "input".len();
            at = end;
            let before = start.checked_sub(1).map(|i| bytes[i]);
            let after = bytes.get(end).copied();
            if before.is_some_and(|b| is_ident(b) || b == b'.') || after.is_some_and(is_ident) {
                // Part of another name, or a field called `input`.
                continue;
            }
            let line_start = code[..start].rfind('\n').map_or(0, |i| i + 1);
            let line = code[line_start..start].trim();
            if line.starts_with("import") || line.ends_with("with") {
                return None;
            }
            let path = static_path(&code[end..])?;
            if path.is_empty() {
                return None;
            }
            paths.push(path);
        }
    }
    paths.sort();
    paths.dedup();
    // A path under another is covered by it.
    let mut kept: Vec<Vec<String>> = Vec::new();
    for path in paths {
        if !kept.iter().any(|k| path.starts_with(k)) {
            kept.push(path);
        }
    }
    // A key holding the request's id (its own, or in the headers) would
    // never match twice: no cache, rather than one that only fills.
    let unique = [
        &["attributes", "request", "http", "id"][..],
        &["attributes", "request", "http", "headers", "x-request-id"][..],
    ];
    if kept.iter().any(|path| {
        unique
            .iter()
            .any(|id| id.starts_with(&path.iter().map(String::as_str).collect::<Vec<_>>()[..]))
    }) {
        return None;
    }
    Some(
        kept.into_iter()
            .map(|path| path.into_iter().map(Value::from).collect())
            .collect(),
    )
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The segments of `.a.b["c"]` at the start of `rest`, up to the first
/// part that is not static.
fn static_path(rest: &str) -> Option<Vec<String>> {
    let bytes = rest.as_bytes();
    let mut path = Vec::new();
    let mut i = 0;
    loop {
        match bytes.get(i) {
            Some(b'.') => {
                let start = i + 1;
                let mut end = start;
                while bytes.get(end).copied().is_some_and(is_ident) {
                    end += 1;
                }
                if end == start {
                    return None;
                }
                path.push(rest[start..end].to_owned());
                i = end;
            }
            Some(b'[') if bytes.get(i + 1) == Some(&b'"') => {
                let start = i + 2;
                let close = rest[start..].find('"')? + start;
                if bytes.get(close + 1) != Some(&b']') || rest[start..close].contains('\\') {
                    // Not a plain string key: the path ends here.
                    return Some(path);
                }
                path.push(rest[start..close].to_owned());
                i = close + 2;
            }
            _ => return Some(path),
        }
    }
}

/// `text` with comments blanked out and string literals' contents kept
/// (a key like `["x-user"]` is read from them) but raw strings blanked.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if c == '\\' {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '`' => {
                out.push(' ');
                for c in chars.by_ref() {
                    if c == '`' {
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The key of `input` for `paths`: the value at each (undefined where it
/// is missing).
pub(crate) fn key(input: &Value, paths: &[CachePath]) -> Vec<KeyPart> {
    paths
        .iter()
        .map(|path| KeyPart::Value(super::descend(input, &path.path)))
        .collect()
}

/// A path of `input` the policy reads, with where a request holds its
/// value: worked out once, when the policy is compiled, so that reading
/// a key matches no names per request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CachePath {
    pub(crate) path: Vec<Value>,
    pub(crate) read: Read,
}

/// Where a path's value is, in OPA-Envoy's input document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Read {
    /// `attributes.request.http.method` (and the `:method` header).
    Method,
    /// `...http.path` (and `:path`).
    Path,
    /// `...http.host` (and `:authority`).
    Host,
    /// `...http.scheme` (and `:scheme`).
    Scheme,
    /// `...http.protocol`.
    Protocol,
    /// `...http.headers.<name>`, a lower-case name.
    Header(Box<str>),
    /// Never there: a header name with upper case (the document's are
    /// lower case).
    Absent,
    /// Under `attributes.source` (0) or `attributes.destination` (1): the
    /// rest of the path.
    Peer(usize, Vec<Value>),
    /// Under `parsed_path`: the rest.
    ParsedPath(Vec<Value>),
    /// Under `parsed_query`: the rest.
    ParsedQuery(Vec<Value>),
    /// Only in the whole document (the request id, the header map, ...).
    Document,
}

impl CachePath {
    pub(crate) fn new(path: Vec<Value>) -> Self {
        let text: Option<Vec<&str>> = path
            .iter()
            .map(|segment| match segment {
                Value::String(s) => Some(&**s),
                _ => None,
            })
            .collect();
        let rest = |from: usize| path[from..].to_vec();
        let read = match text.as_deref() {
            Some(["attributes", "source", ..]) => Read::Peer(0, rest(2)),
            Some(["attributes", "destination", ..]) => Read::Peer(1, rest(2)),
            Some(["attributes", "request", "http", "method"]) => Read::Method,
            Some(["attributes", "request", "http", "path"]) => Read::Path,
            Some(["attributes", "request", "http", "host"]) => Read::Host,
            Some(["attributes", "request", "http", "scheme"]) => Read::Scheme,
            Some(["attributes", "request", "http", "protocol"]) => Read::Protocol,
            Some(["attributes", "request", "http", "headers", name]) => match *name {
                ":method" => Read::Method,
                ":path" => Read::Path,
                ":authority" => Read::Host,
                ":scheme" => Read::Scheme,
                name if name.bytes().any(|b| b.is_ascii_uppercase()) => Read::Absent,
                name => Read::Header(name.into()),
            },
            Some(["parsed_path", ..]) => Read::ParsedPath(rest(1)),
            Some(["parsed_query", ..]) => Read::ParsedQuery(rest(1)),
            _ => Read::Document,
        };
        Self { path, read }
    }
}

/// One part of a key: the value at one of the policy's paths, or, for a
/// compound value that comes with a connection (an object under
/// `attributes.source` or `attributes.destination`), the connection and
/// the path: the same on every request of the connection, and compared as
/// two numbers rather than two objects.
///
/// Sound because a connection's peers never change and connection
/// numbers are never reused; two connections with equal peers only keep
/// two entries.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum KeyPart {
    Value(Value),
    Connection { connection: u64, path: usize },
}

thread_local! {
    static DECISIONS: RefCell<HashMap<u64, BTreeMap<Vec<KeyPart>, Verdict>>> =
        RefCell::new(HashMap::new());
}

/// The decision cached for `key` under the compilation `id`.
pub(crate) fn get(id: u64, key: &[KeyPart]) -> Option<Verdict> {
    DECISIONS.with(|cache| cache.borrow().get(&id)?.get(key).cloned())
}

/// Caches `verdict` for `key` under the compilation `id`.
pub(crate) fn put(id: u64, key: Vec<KeyPart>, verdict: Verdict) {
    DECISIONS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(decisions) = per_compilation(&mut cache, id, || Some(BTreeMap::new())) {
            if decisions.len() >= MAX_ENTRIES {
                decisions.clear();
            }
            decisions.insert(key, verdict);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(rego: &str) -> Option<Vec<String>> {
        input_paths(&[Module {
            name: "p.rego".into(),
            text: rego.into(),
        }])
        .map(|paths| {
            paths
                .iter()
                .map(|p| {
                    p.iter()
                        .map(|s| s.as_string().unwrap().to_string())
                        .collect::<Vec<_>>()
                        .join(".")
                })
                .collect()
        })
    }

    #[test]
    fn static_reads_of_the_input_make_the_key() {
        let rego = r#"
package envoy.authz
import rego.v1
# input is only read below; this comment says input[anything]
default allow := false
allow if {
    input.attributes.request.http.method == "GET"
    input.attributes.source["principal"] == "spiffe://td/ns/a/sa/b"
    some user in input.attributes.request.http.headers["x-user"]
    input.parsed_path[0] == "items"
}
"#;
        assert_eq!(
            paths(rego).unwrap(),
            [
                "attributes.request.http.headers.x-user",
                "attributes.request.http.method",
                "attributes.source.principal",
                "parsed_path",
            ]
        );
    }

    #[test]
    fn a_path_under_another_is_covered_by_it() {
        let rego =
            "package p\nallow if input.parsed_path\nallow if input.parsed_path[1] == \"x\"\n";
        assert_eq!(paths(rego).unwrap(), ["parsed_path"]);
    }

    #[test]
    fn unstable_calls_and_dynamic_reads_of_the_input_rule_a_cache_out() {
        for rego in [
            "package p\nallow if time.now_ns() > 0\n",
            "package p\nallow if { [ok, _, _] := io.jwt.decode_verify(input.t, {}); ok }\n",
            "package p\nallow if rand.intn(\"x\", 2) == 1\n",
            "package p\nallow if count(input) > 0\n",
            "package p\nallow if input[k] == 1\n",
            "package p\nimport input.attributes as a\nallow if a.x\n",
            "package p\nallow if x with input as {}\n",
            "package p\nf(i) := i\nallow if f(input)\n",
            // Sound, but keyed on the request id: it would never hit.
            "package p\nallow if input.attributes.request.http.headers[name] == \"x\"\n",
            "package p\nallow if input.attributes.request.http.id != \"\"\n",
            "package p\nallow if object.get(input.attributes.request, \"x\", 1)\n",
        ] {
            assert_eq!(paths(rego), None, "{rego}");
        }
    }

    #[test]
    fn the_key_holds_each_paths_value() {
        let input = Value::from(serde_json::json!({
            "attributes": { "request": { "http": { "method": "GET" } } },
            "parsed_path": ["items", "7"],
        }));
        let paths = vec![
            vec![
                Value::from("attributes"),
                Value::from("request"),
                Value::from("http"),
                Value::from("method"),
            ],
            vec![Value::from("parsed_path")],
            vec![Value::from("missing")],
        ]
        .into_iter()
        .map(CachePath::new)
        .collect::<Vec<_>>();
        assert_eq!(
            key(&input, &paths),
            [
                Value::from("GET"),
                Value::from(serde_json::json!(["items", "7"])),
                Value::Undefined,
            ]
            .map(KeyPart::Value)
        );
    }
}
