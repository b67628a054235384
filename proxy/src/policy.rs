//! Policy as code: Rego evaluated in-process by regorus on every request
//! a policy applies to, with the input document of the OPA-Envoy plugin so
//! that its policies run unchanged.
//!
//! A policy is compiled once, when its configuration is validated: the
//! modules parsed, the data loaded, the query checked. The request path
//! clones that prepared engine once per worker thread and policy version
//! (a thread-local cache), sets the input and evaluates: no Rego is parsed
//! and no lock is taken per request.
//!
//! The [`PolicyLayer`] sits on top of a route's stack; a listener's policy
//! is checked by the connection before routing. A deny is a local answer:
//! 403 (or the decision's status) with the decision's headers and body,
//! `PERMISSION_DENIED` for gRPC callers.

mod builtins;
mod cache;
mod index;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use regorus::Value;
use regorus::rvm::RegoVM;
use regorus::rvm::program::Program;

use crate::error::ProxyError;
use crate::http::body::ResponseBody;
use crate::http::error::{Decision, ERROR_HEADER, is_grpc};
use crate::telemetry::PolicyMetrics;

mod decision_log;
mod testing;
pub use decision_log::DecisionLog;
pub use testing::TestOutcome;

/// OPA-Envoy's default decision: `package envoy.authz`, rule `allow`.
pub const DEFAULT_QUERY: &str = "data.envoy.authz.allow";
/// One evaluation may run this long before it counts as an error.
const EVALUATION_LIMIT: Duration = Duration::from_millis(50);

/// Whether a policy's denials are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Denied requests are refused.
    Enforce,
    /// Denied requests pass; the denial is logged and counted.
    Audit,
}

/// What an evaluation error means for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureMode {
    /// Refused, as a denial (the safe default).
    Deny,
    /// Allowed.
    Allow,
}

/// A compiled policy: its prepared engine and what to ask it.
#[derive(Debug)]
pub struct CompiledPolicy {
    /// Policy name, a metrics label.
    pub name: Arc<str>,
    /// A digest of the modules, data and query (changes with any of them).
    pub version: u64,
    /// The rule evaluated (`data.envoy.authz.allow`).
    pub query: String,
    /// Enforce or audit.
    pub mode: Mode,
    /// What an evaluation error means.
    pub failure_mode: FailureMode,
    engine: regorus::Engine,
    /// The query compiled to regorus's virtual machine, with the data it
    /// runs on, when the policy compiles to it (see [`vm_program`]).
    program: Option<VmProgram>,
    /// The input paths decisions are cached on, when a cache is sound for
    /// this policy ([`cache`]).
    cache_paths: Option<Vec<cache::CachePath>>,
    /// Distinguishes this compilation from every other one in the process,
    /// for the per-thread engine cache.
    id: u64,
}

/// A policy's query compiled to regorus's virtual machine (RVM): bytecode
/// run on registers, where the interpreter walks the syntax tree. `None`
/// when the policy does not compile to it or does not load there; such a
/// policy runs on the interpreter alone.
///
/// PERF: `cargo bench -p weft-bench --bench policy` (benches/RESULTS.md):
/// the interpreter took 173 µs per decision for 100 RBAC rules, the VM
/// takes a fraction of it.
fn vm_program(
    engine: &regorus::Engine,
    query: &str,
    data: &Value,
    rego_v0: bool,
) -> Option<VmProgram> {
    let mut engine = engine.clone();
    let indexed = index::RuleIndex::build(engine.get_modules(), query).and_then(|indexed| {
        let mut with_copies = new_engine(rego_v0).ok()?;
        for (name, text) in indexed.modules {
            with_copies.add_policy(name, text).ok()?;
        }
        with_copies.add_data(data.clone()).ok()?;
        let mut entry_points = vec![query];
        entry_points.extend(indexed.entry_points.iter().map(String::as_str));
        Some((program_of(&mut with_copies, &entry_points)?, indexed.index))
    });
    let (program, index) = match indexed {
        Some((program, index)) => (program, Some(index)),
        None => (program_of(&mut engine, &[query])?, None),
    };
    // Data the program cannot hold (a rule and a document at one path) is
    // found now, not on a request.
    let mut vm = new_vm(&program);
    vm.set_data(data.clone()).ok()?;
    Some(VmProgram {
        program,
        data: data.clone(),
        index,
    })
}

/// `engine`'s policy compiled for the virtual machine, with
/// `entry_points` (the query first: [`RegoVM::execute`] runs it).
fn program_of(engine: &mut regorus::Engine, entry_points: &[&str]) -> Option<Arc<Program>> {
    let compiled = engine
        .compile_with_entrypoint(&regorus::Rc::from(*entry_points.first()?))
        .ok()?;
    regorus::languages::rego::compiler::Compiler::compile_from_policy(&compiled, entry_points).ok()
}

/// What a policy runs on regorus's virtual machine.
#[derive(Debug)]
struct VmProgram {
    program: Arc<Program>,
    data: Value,
    /// The decision rule's index, when the policy has one ([`index`]):
    /// its definitions' copies are the program's other entry points.
    index: Option<index::RuleIndex>,
}

/// An engine with the settings and builtins every policy gets.
fn new_engine(rego_v0: bool) -> Result<regorus::Engine, String> {
    let mut engine = regorus::Engine::new();
    engine.set_rego_v0(rego_v0);
    // As OPA evaluates by default: a builtin's error makes its call
    // undefined rather than failing the whole evaluation.
    engine.set_strict_builtin_errors(false);
    builtins::register(&mut engine, false)?;
    Ok(engine)
}

/// A virtual machine ready to run `program`, with the evaluation limits
/// the interpreter has.
fn new_vm(program: &Arc<Program>) -> RegoVM {
    let mut vm = RegoVM::new();
    vm.load_program(program.clone());
    vm.set_max_instructions(VM_INSTRUCTION_LIMIT);
    vm.set_execution_timer_config(Some(regorus::utils::limits::ExecutionTimerConfig {
        limit: EVALUATION_LIMIT,
        check_interval: std::num::NonZeroU32::MIN.saturating_add(63),
    }));
    vm
}

/// The most instructions one decision may run on the virtual machine
/// (regorus's default is 25,000; the time limit bounds it too).
const VM_INSTRUCTION_LIMIT: usize = 10_000_000;

impl PartialEq for CompiledPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.name == other.name
            && self.mode == other.mode
            && self.failure_mode == other.failure_mode
    }
}

/// A Rego source: its name for error messages (a file path, or
/// `<policy>.rego` for inline text) and the text.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    pub text: String,
}

impl CompiledPolicy {
    /// Parses `modules` (Rego v1, or v0 with `rego_v0`), loads `data` and
    /// checks that `query` names a rule path. Errors carry the module's
    /// name and the line.
    pub fn compile(
        name: &str,
        modules: &[Module],
        data: Option<&serde_json::Value>,
        query: &str,
        rego_v0: bool,
        mode: Mode,
        failure_mode: FailureMode,
    ) -> Result<Self, String> {
        use std::hash::{Hash, Hasher};
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut engine = new_engine(rego_v0)?;
        let mut digest = std::collections::hash_map::DefaultHasher::new();
        for module in modules {
            engine
                .add_policy(module.name.clone(), module.text.clone())
                .map_err(|e| e.to_string())?;
            module.name.hash(&mut digest);
            rego_v0.hash(&mut digest);
            module.text.hash(&mut digest);
        }
        let mut data_value = Value::new_object();
        if let Some(data) = data {
            data_value = Value::from(data.clone());
            engine
                .add_data(data_value.clone())
                .map_err(|e| format!("data: {e}"))?;
            data.to_string().hash(&mut digest);
        }
        if !query.starts_with("data.") {
            return Err(format!(
                "query {query:?} must name a rule, e.g. {DEFAULT_QUERY}"
            ));
        }
        query.hash(&mut digest);
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: EVALUATION_LIMIT,
            check_interval: std::num::NonZeroU32::MIN.saturating_add(63),
        });
        // A rule path that does not exist is an error now, not on the
        // first request.
        let mut probe = engine.clone();
        probe.set_input(Value::new_object());
        if let Err(error) = probe.eval_rule(query.to_owned()) {
            let text = error.to_string();
            if text.contains("not a valid rule path") || text.contains("not found") {
                return Err(format!("query {query:?}: {text}"));
            }
        }
        let program = vm_program(&engine, query, &data_value, rego_v0);
        // A policy its index decides without running anything gains
        // nothing from a cache, and a miss (a key built, kept, dropped)
        // costs more than the index's decision.
        let decided_by_index = program
            .as_ref()
            .and_then(|p| p.index.as_ref())
            .is_some_and(index::RuleIndex::decides_alone);
        let cache_paths = cache::input_paths(modules)
            .filter(|_| !decided_by_index)
            .map(|paths| paths.into_iter().map(cache::CachePath::new).collect());
        Ok(Self {
            name: Arc::from(name),
            version: digest.finish(),
            query: query.to_owned(),
            mode,
            failure_mode,
            engine,
            program,
            cache_paths,
            id: NEXT_ID.fetch_add(1, Relaxed),
        })
    }

    /// Whether decisions are cached (see the `cache` module).
    pub fn caches_decisions(&self) -> bool {
        self.cache_paths.is_some()
    }

    /// Decides on `source`, answering from this thread's decision cache
    /// when the policy has one and it holds the decision. The input
    /// document is built only when the policy is evaluated, or when the
    /// key cannot be read from `source` directly.
    pub(crate) fn evaluate_from(&self, source: &dyn InputSource) -> Evaluated {
        let mut built = None;
        let Some(paths) = &self.cache_paths else {
            let result = self.decide_on(source, &mut built);
            return Evaluated {
                result,
                cached: false,
                input: built,
            };
        };
        let key = match paths
            .iter()
            .enumerate()
            .map(|(index, path)| source.key_part(index, path))
            .collect()
        {
            Some(key) => key,
            None => cache::key(built.insert(source.build()), paths),
        };
        if let Some(verdict) = cache::get(self.id, &key) {
            return Evaluated {
                result: Ok(verdict),
                cached: true,
                input: built,
            };
        }
        let result = self.decide_on(source, &mut built);
        if let Ok(verdict) = &result {
            cache::put(self.id, key, verdict.clone());
        }
        Evaluated {
            result,
            cached: false,
            input: built,
        }
    }

    /// Whether decisions run on regorus's virtual machine.
    pub fn runs_on_vm(&self) -> bool {
        self.program.is_some()
    }

    /// Whether the decision rule is indexed (see the `index` module).
    pub fn indexes_rules(&self) -> bool {
        self.program.as_ref().is_some_and(|p| p.index.is_some())
    }

    /// Evaluates the query against `input` (see [`Self::decide_on`]).
    #[cfg(test)]
    pub(crate) fn evaluate(&self, input: &Value) -> Result<Verdict, String> {
        self.decide_on(input, &mut None)
    }

    /// Decides on `source`. An indexed policy first reads the values its
    /// conditions test, from `source` directly where it can: when they
    /// decide, no document is built. Otherwise the document is built into
    /// `built` (unless already there) and evaluated.
    fn decide_on(
        &self,
        source: &dyn InputSource,
        built: &mut Option<Value>,
    ) -> Result<Verdict, String> {
        let mut candidates = None;
        if let Some(index) = self.program.as_ref().and_then(|p| p.index.as_ref()) {
            let values: Vec<Value> = index
                .paths()
                .iter()
                .map(|path| {
                    source.at(path).unwrap_or_else(|| {
                        descend(built.get_or_insert_with(|| source.build()), &path.path)
                    })
                })
                .collect();
            match index.plan(&values) {
                Some(index::Plan::Decided(value)) => return Verdict::from_value(&value),
                Some(index::Plan::Run(run)) => candidates = Some(run),
                None => {}
            }
        }
        let input = built.get_or_insert_with(|| source.build()).clone();
        self.run(input, candidates.as_deref())
    }

    /// Evaluates the query against `input` on this thread's virtual
    /// machine (only the definitions `candidates` when the index chose
    /// them), or its engine (the interpreter) when the policy does not run
    /// on the machine, the machine fails or its answer is undefined: the
    /// interpreter's answer is the authoritative one.
    fn run(&self, input: Value, candidates: Option<&[usize]>) -> Result<Verdict, String> {
        thread_local! {
            static ENGINES: RefCell<HashMap<u64, regorus::Engine>> = RefCell::new(HashMap::new());
            static VMS: RefCell<HashMap<u64, RegoVM>> = RefCell::new(HashMap::new());
        }
        if let Some(on_vm) = &self.program {
            let ran = VMS.with(|vms| {
                let mut vms = vms.borrow_mut();
                let vm = per_compilation(&mut vms, self.id, || {
                    let mut vm = new_vm(&on_vm.program);
                    vm.set_data(on_vm.data.clone()).ok()?;
                    Some(vm)
                })?;
                vm.set_input(input.clone());
                if let (Some(index), Some(candidates)) = (&on_vm.index, candidates)
                    && let Some(value) = index.run(vm, candidates)
                {
                    return Some(value);
                }
                vm.execute().ok()
            });
            // Undefined is also what the machine gives for a rule whose
            // definitions conflict, an error in OPA (and the interpreter):
            // that case is asked again, so that the failure mode applies.
            if let Some(value) = ran.filter(|value| *value != Value::Undefined) {
                return Verdict::from_value(&value);
            }
        }
        ENGINES.with(|engines| {
            let mut engines = engines.borrow_mut();
            let Some(engine) = per_compilation(&mut engines, self.id, || Some(self.engine.clone()))
            else {
                return Err("no engine for the policy".to_owned());
            };
            engine.set_input(input);
            let value = engine
                .eval_rule(self.query.clone())
                .map_err(|e| e.to_string())?;
            Verdict::from_value(&value)
        })
    }
}

/// Compilations a worker thread keeps state for (engines, machines,
/// decisions); past this its map starts over, so old versions of
/// hot-swapped policies do not pile up.
const MAX_COMPILATIONS: usize = 64;

/// This thread's state for the compilation `id` in `map`, made by `make`
/// when missing (`None` if `make` cannot).
fn per_compilation<T>(
    map: &mut HashMap<u64, T>,
    id: u64,
    make: impl FnOnce() -> Option<T>,
) -> Option<&mut T> {
    if !map.contains_key(&id) && map.len() >= MAX_COMPILATIONS {
        map.clear();
    }
    match map.entry(id) {
        std::collections::hash_map::Entry::Occupied(entry) => Some(entry.into_mut()),
        std::collections::hash_map::Entry::Vacant(slot) => Some(slot.insert(make()?)),
    }
}

/// What a policy decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) allowed: bool,
    /// A deny's status (default 403).
    pub(crate) status: Option<StatusCode>,
    /// Headers added to a deny's response.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// A deny's body.
    pub(crate) body: Option<String>,
    /// Why, for the log.
    pub(crate) reason: Option<String>,
}

impl Verdict {
    /// A boolean rule, or OPA-Envoy's decision object (`allowed`,
    /// `http_status`, `headers`, `body`, and `reason`). An undefined rule
    /// is a deny, as in OPA.
    fn from_value(value: &Value) -> Result<Self, String> {
        let plain = |allowed| Self {
            allowed,
            status: None,
            headers: Vec::new(),
            body: None,
            reason: None,
        };
        match value {
            Value::Bool(allowed) => Ok(plain(*allowed)),
            Value::Undefined => Ok(plain(false)),
            Value::Object(object) => {
                let field = |name: &str| object.get(&Value::from(name));
                let allowed = match field("allowed") {
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(format!("decision.allowed is not a boolean: {other}"));
                    }
                    None => return Err("the decision object has no `allowed`".to_owned()),
                };
                let status = match field("http_status") {
                    None => None,
                    Some(v) => {
                        let code = v
                            .as_u64()
                            .ok()
                            .and_then(|c| u16::try_from(c).ok())
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .filter(|s| (200..=599).contains(&s.as_u16()))
                            .ok_or_else(|| {
                                format!("decision.http_status {v} is not an HTTP status")
                            })?;
                        Some(code)
                    }
                };
                let mut headers = Vec::new();
                if let Some(Value::Object(map)) = field("headers") {
                    for (name, value) in map.iter() {
                        let (Ok(name), Ok(value)) = (name.as_string(), value.as_string()) else {
                            return Err("decision.headers must map names to strings".to_owned());
                        };
                        let name = HeaderName::from_bytes(name.as_bytes())
                            .map_err(|_| format!("decision.headers: invalid name {name:?}"))?;
                        let value = HeaderValue::from_str(value)
                            .map_err(|_| format!("decision.headers: invalid value for {name}"))?;
                        headers.push((name, value));
                    }
                }
                let text = |name: &str| {
                    field(name)
                        .and_then(|v| v.as_string().ok())
                        .map(|s| s.to_string())
                };
                Ok(Self {
                    allowed,
                    status,
                    headers,
                    body: text("body"),
                    reason: text("reason"),
                })
            }
            other => Err(format!(
                "the query gave {other}, not a boolean or a decision object"
            )),
        }
    }
}

/// Who is on each end of the request, for the input document.
#[derive(Debug, Clone)]
pub(crate) struct Peers {
    pub(crate) source: SocketAddr,
    pub(crate) source_principal: Option<Arc<str>>,
    pub(crate) destination: Option<SocketAddr>,
    pub(crate) destination_principal: Option<Arc<str>>,
    /// `attributes.source` and `attributes.destination` as input values,
    /// made by the connection's first decision.
    ///
    /// PERF: the same for every request of a connection, so built once:
    /// three maps and an address formatted per side per request saved.
    values: std::sync::OnceLock<[Value; 2]>,
    /// Unique to this connection (never reused): what a decision cache
    /// key holds in place of these values when they are objects.
    id: u64,
}

impl Peers {
    pub(crate) fn new(
        source: SocketAddr,
        source_principal: Option<Arc<str>>,
        destination: Option<SocketAddr>,
        destination_principal: Option<Arc<str>>,
    ) -> Self {
        Self {
            source,
            source_principal,
            destination,
            destination_principal,
            values: std::sync::OnceLock::new(),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, Relaxed)
            },
        }
    }

    /// The source's and the destination's input values.
    fn values(&self) -> &[Value; 2] {
        self.values.get_or_init(|| {
            [
                endpoint(Some(self.source), self.source_principal.as_deref()),
                endpoint(self.destination, self.destination_principal.as_deref()),
            ]
        })
    }
}

/// The input document's keys, made once: a key per request is then a
/// reference-count increment, not an allocation and a copy.
struct Keys {
    address: Value,
    port_value: Value,
    socket_address: Value,
    principal: Value,
    id: Value,
    method: Value,
    host: Value,
    path: Value,
    scheme: Value,
    protocol: Value,
    headers: Value,
    http: Value,
    request: Value,
    source: Value,
    destination: Value,
    attributes: Value,
    parsed_path: Value,
    parsed_query: Value,
    authority_pseudo: Value,
    method_pseudo: Value,
    path_pseudo: Value,
    scheme_pseudo: Value,
    /// Values most requests share.
    get: Value,
    post: Value,
    http_scheme: Value,
    https_scheme: Value,
    http1: Value,
    http10: Value,
    http2: Value,
    empty: Value,
}

fn keys() -> &'static Keys {
    static KEYS: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(|| Keys {
        address: Value::from("address"),
        port_value: Value::from("portValue"),
        socket_address: Value::from("socketAddress"),
        principal: Value::from("principal"),
        id: Value::from("id"),
        method: Value::from("method"),
        host: Value::from("host"),
        path: Value::from("path"),
        scheme: Value::from("scheme"),
        protocol: Value::from("protocol"),
        headers: Value::from("headers"),
        http: Value::from("http"),
        request: Value::from("request"),
        source: Value::from("source"),
        destination: Value::from("destination"),
        attributes: Value::from("attributes"),
        parsed_path: Value::from("parsed_path"),
        parsed_query: Value::from("parsed_query"),
        authority_pseudo: Value::from(":authority"),
        method_pseudo: Value::from(":method"),
        path_pseudo: Value::from(":path"),
        scheme_pseudo: Value::from(":scheme"),
        get: Value::from("GET"),
        post: Value::from("POST"),
        http_scheme: Value::from("http"),
        https_scheme: Value::from("https"),
        http1: Value::from("HTTP/1.1"),
        http10: Value::from("HTTP/1.0"),
        http2: Value::from("HTTP/2"),
        empty: Value::from(""),
    });
    &KEYS
}

/// `{"address": {"socketAddress": {...}}, "principal": ...}`: an
/// endpoint's address and, when proved, its SPIFFE ID.
fn endpoint(addr: Option<SocketAddr>, principal: Option<&str>) -> Value {
    let k = keys();
    let mut map = BTreeMap::new();
    if let Some(addr) = addr {
        let mut inner = BTreeMap::new();
        inner.insert(k.address.clone(), Value::from(addr.ip().to_string()));
        inner.insert(k.port_value.clone(), Value::from(u64::from(addr.port())));
        let mut socket = BTreeMap::new();
        socket.insert(k.socket_address.clone(), Value::from(inner));
        map.insert(k.address.clone(), Value::from(socket));
    }
    if let Some(principal) = principal {
        map.insert(k.principal.clone(), Value::from(principal));
    }
    Value::from(map)
}

/// `a%2Fb` -> `a/b`, `+` kept (it is a path, not a form).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            // Two hex digits make one byte.
            #[allow(clippy::cast_possible_truncation)]
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A decision, and the input document if it was built.
pub(crate) struct Evaluated {
    pub(crate) result: Result<Verdict, String>,
    /// Answered from the decision cache.
    pub(crate) cached: bool,
    pub(crate) input: Option<Value>,
}

/// A document already built is its own source.
impl InputSource for Value {
    fn build(&self) -> Value {
        self.clone()
    }

    fn at(&self, path: &cache::CachePath) -> Option<Value> {
        Some(descend(self, &path.path))
    }
}

/// What a decision is made on, from which its input document is built:
/// whole when the policy is evaluated or the decision logged, or only the
/// values a cached policy's key reads, when those can be read directly
/// (then a decision answered from the cache builds no document).
pub(crate) trait InputSource {
    /// The OPA-Envoy input document.
    fn build(&self) -> Value;
    /// The value at `path` of that document (`Undefined` where it has
    /// none), read without building it; `None` when this source cannot.
    fn at(&self, path: &cache::CachePath) -> Option<Value>;
    /// The cache key's part for the policy's `index`th path: the value
    /// there, read as [`InputSource::at`] does; under a peer, a compound
    /// value is the connection (see [`cache::KeyPart`]).
    fn key_part(&self, index: usize, path: &cache::CachePath) -> Option<cache::KeyPart> {
        let value = self.at(path)?;
        Some(match (&path.read, self.peers()) {
            (cache::Read::Peer(..), Some(peers)) => peer_part(peers, index, value),
            _ => cache::KeyPart::Value(value),
        })
    }
    /// The connection's ends, when the source is a connection's.
    fn peers(&self) -> Option<&Peers> {
        None
    }
}

/// The key part of a value under a connection's peers: the value when it
/// is a scalar (cheap to compare, and shared by connections), else the
/// connection and the path.
fn peer_part(peers: &Peers, index: usize, value: Value) -> cache::KeyPart {
    match value {
        Value::Object(_) | Value::Array(_) | Value::Set(_) => cache::KeyPart::Connection {
            connection: peers.id,
            path: index,
        },
        scalar => cache::KeyPart::Value(scalar),
    }
}

/// Descends from `value` along `path` (`Undefined` where it leads
/// nowhere).
fn descend(value: &Value, path: &[Value]) -> Value {
    let mut at = value;
    for segment in path {
        match at.as_object().ok().and_then(|o| o.get(segment)) {
            Some(next) => at = next,
            None => return Value::Undefined,
        }
    }
    at.clone()
}

/// An HTTP request and its connection's ends.
pub(crate) struct HttpRequest<'a, B> {
    pub(crate) req: &'a Request<B>,
    pub(crate) peers: &'a Peers,
    pub(crate) is_tls: bool,
}

impl<B> HttpRequest<'_, B> {
    fn method(&self) -> Value {
        let k = keys();
        match *self.req.method() {
            http::Method::GET => k.get.clone(),
            http::Method::POST => k.post.clone(),
            ref other => Value::from(other.as_str()),
        }
    }

    /// `path`: the path with its query string.
    fn path(&self) -> Value {
        let uri = self.req.uri();
        Value::from(
            uri.path_and_query()
                .map_or_else(|| uri.path(), http::uri::PathAndQuery::as_str),
        )
    }

    fn host(&self) -> Value {
        let uri = self.req.uri();
        Value::from(
            self.req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| uri.authority().map(http::uri::Authority::as_str))
                .unwrap_or(""),
        )
    }

    fn scheme(&self) -> &'static Value {
        let k = keys();
        if self.is_tls {
            &k.https_scheme
        } else {
            &k.http_scheme
        }
    }

    fn protocol(&self) -> &'static Value {
        let k = keys();
        match self.req.version() {
            http::Version::HTTP_2 => &k.http2,
            http::Version::HTTP_10 => &k.http10,
            _ => &k.http1,
        }
    }

    /// A header's value as the document has it: repeated headers joined
    /// with `, ` (as Envoy does), values that are not text left out.
    fn header(&self, name: &str) -> Option<Value> {
        let mut values = self
            .req
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let first = values.next()?;
        Some(match values.next() {
            None => Value::from(first),
            Some(second) => {
                let mut joined = format!("{first}, {second}");
                for value in values {
                    joined.push_str(", ");
                    joined.push_str(value);
                }
                Value::from(joined)
            }
        })
    }

    /// `parsed_path`: the path's segments, percent-decoded.
    fn parsed_path(&self) -> Value {
        let segments: Vec<Value> = self
            .req
            .uri()
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| Value::from(percent_decode(s)))
            .collect();
        Value::from(segments)
    }

    /// `parsed_query`: each parameter's values, in order.
    fn parsed_query(&self) -> Value {
        let mut parsed_query: BTreeMap<Value, Vec<Value>> = BTreeMap::new();
        for pair in self
            .req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            parsed_query
                .entry(Value::from(percent_decode(&key.replace('+', " "))))
                .or_default()
                .push(Value::from(percent_decode(&value.replace('+', " "))));
        }
        let parsed_query: BTreeMap<Value, Value> = parsed_query
            .into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect();
        Value::from(parsed_query)
    }
}

impl<B> InputSource for HttpRequest<'_, B> {
    fn peers(&self) -> Option<&Peers> {
        Some(self.peers)
    }

    fn build(&self) -> Value {
        let k = keys();
        let mut headers: BTreeMap<Value, Value> = BTreeMap::new();
        for name in self.req.headers().keys() {
            if let Some(value) = self.header(name.as_str()) {
                headers.insert(Value::from(name.as_str()), value);
            }
        }
        // PERF: a value that appears twice (`method` and `:method`, ...) is
        // made once; common ones are never made per request.
        let method = self.method();
        let host = self.host();
        let path = self.path();
        let scheme = self.scheme();
        for (name, value) in [
            (&k.authority_pseudo, &host),
            (&k.method_pseudo, &method),
            (&k.path_pseudo, &path),
            (&k.scheme_pseudo, scheme),
        ] {
            headers.insert(name.clone(), value.clone());
        }
        let id = self
            .header("x-request-id")
            .unwrap_or_else(|| k.empty.clone());
        let mut http = BTreeMap::new();
        http.insert(k.id.clone(), id);
        http.insert(k.method.clone(), method);
        http.insert(k.host.clone(), host);
        http.insert(k.path.clone(), path);
        http.insert(k.scheme.clone(), scheme.clone());
        http.insert(k.protocol.clone(), self.protocol().clone());
        http.insert(k.headers.clone(), Value::from(headers));
        let mut request = BTreeMap::new();
        request.insert(k.http.clone(), Value::from(http));
        let mut attributes = BTreeMap::new();
        attributes.insert(k.request.clone(), Value::from(request));
        let [source, destination] = self.peers.values();
        attributes.insert(k.source.clone(), source.clone());
        attributes.insert(k.destination.clone(), destination.clone());
        let mut input = BTreeMap::new();
        input.insert(k.attributes.clone(), Value::from(attributes));
        input.insert(k.parsed_path.clone(), self.parsed_path());
        input.insert(k.parsed_query.clone(), self.parsed_query());
        Value::from(input)
    }

    fn at(&self, path: &cache::CachePath) -> Option<Value> {
        use cache::Read;
        Some(match &path.read {
            Read::Peer(side, rest) => descend(&self.peers.values()[*side], rest),
            Read::Method => self.method(),
            Read::Path => self.path(),
            Read::Host => self.host(),
            Read::Scheme => self.scheme().clone(),
            Read::Protocol => self.protocol().clone(),
            Read::Header(name) => self.header(name).unwrap_or(Value::Undefined),
            Read::Absent => Value::Undefined,
            Read::ParsedPath(rest) => descend(&self.parsed_path(), rest),
            Read::ParsedQuery(rest) => descend(&self.parsed_query(), rest),
            // The id, and the whole header map, are not read this way (the
            // cache refuses keys on them).
            Read::Document => return None,
        })
    }
}

/// A connection's caller as the request path holds it: its part of the
/// input is built by the first decision and reused by the others. For
/// benchmarks.
#[derive(Debug)]
pub struct Caller(Peers);

impl Caller {
    /// A caller at `source`, with its certificate's identity if any.
    pub fn new(source: SocketAddr, principal: Option<&str>) -> Self {
        Self(Peers::new(source, principal.map(Arc::from), None, None))
    }
}

/// One HTTP decision as the request path makes it (the input built from
/// the request, then evaluated on this thread's engine, or answered from
/// its decision cache when `cached` and the policy has one), without the
/// counting and logging around it: `Ok(true)` when allowed. For
/// benchmarks.
pub fn evaluate_request<B>(
    policy: &CompiledPolicy,
    req: &Request<B>,
    caller: &Caller,
    cached: bool,
) -> Result<bool, String> {
    let request = HttpRequest {
        req,
        peers: &caller.0,
        is_tls: false,
    };
    let result = if cached {
        policy.evaluate_from(&request).result
    } else {
        policy.decide_on(&request, &mut None)
    };
    result.map(|verdict| verdict.allowed)
}

/// What the request path does with a request, after its policy.
#[derive(Debug)]
pub(crate) enum Outcome {
    Allow,
    /// Refused: the response to send (boxed: denials are the rare case).
    Deny(Box<Response<ResponseBody>>),
}

/// Evaluates the policy for `req`, counts and logs the decision, and says
/// what to do with the request.
pub(crate) fn check<B>(
    state: &Enforcing,
    req: &Request<B>,
    peers: &Peers,
    is_tls: bool,
) -> Outcome {
    let start = Instant::now();
    let input = HttpRequest { req, peers, is_tls };
    let subject = || {
        format!(
            "{} {} from {}",
            req.method(),
            req.uri().path(),
            peers.source_principal.as_deref().unwrap_or("-")
        )
    };
    match decide(state, &input, start, subject) {
        Decided::Allow => Outcome::Allow,
        Decided::Deny(verdict) => {
            Outcome::Deny(Box::new(denied(verdict.as_ref(), is_grpc(req.headers()))))
        }
    }
}

/// A TCP connection's ends: its input document holds who is on each end
/// (`attributes.source`, `attributes.destination`), nothing more.
struct Connection<'a>(&'a Peers);

impl InputSource for Connection<'_> {
    fn peers(&self) -> Option<&Peers> {
        Some(self.0)
    }

    fn build(&self) -> Value {
        let k = keys();
        let mut attributes = BTreeMap::new();
        let [source, destination] = self.0.values();
        attributes.insert(k.source.clone(), source.clone());
        attributes.insert(k.destination.clone(), destination.clone());
        let mut input = BTreeMap::new();
        input.insert(k.attributes.clone(), Value::from(attributes));
        Value::from(input)
    }

    fn at(&self, path: &cache::CachePath) -> Option<Value> {
        match &path.read {
            cache::Read::Peer(side, rest) => Some(descend(&self.0.values()[*side], rest)),
            _ => None,
        }
    }
}

/// Evaluates a TCP listener's policy for a new connection, counts and
/// logs the decision: `true` lets the connection through.
pub(crate) fn check_connection(state: &Enforcing, peers: &Peers) -> bool {
    let start = Instant::now();
    let subject = || format!("connection from {}", peers.source);
    matches!(
        decide(state, &Connection(peers), start, subject),
        Decided::Allow
    )
}

/// What [`decide`] concluded.
enum Decided {
    Allow,
    /// Refused; the policy's decision when it gave one (an evaluation
    /// error gives none).
    Deny(Option<Verdict>),
}

/// Evaluates `input`, counts the decision, logs it, and applies the
/// policy's mode (audit allows) and failure mode (an error allows or
/// denies). `subject` names what was decided on, for the audit log line.
fn decide(
    state: &Enforcing,
    source: &dyn InputSource,
    start: Instant,
    subject: impl Fn() -> String,
) -> Decided {
    let (policy, metrics) = (&*state.policy, &*state.metrics);
    let Evaluated {
        result,
        cached,
        input,
    } = policy.evaluate_from(source);
    if cached {
        metrics.cache_hits.fetch_add(1, Relaxed);
    }
    let elapsed = start.elapsed();
    metrics.observe(elapsed);
    // The decision log's line takes the document evaluated (a reference-
    // counted copy), else (a cached decision) one built now, only for a
    // line that is written.
    let log = |result: &'static str, reason: Option<&str>| {
        if let Some(log) = &state.log
            && log.wants(result)
        {
            let input = input.clone().unwrap_or_else(|| source.build());
            log.record(decision_log::Decision {
                time: std::time::SystemTime::now(),
                policy: policy.name.clone(),
                version: policy.version,
                result,
                reason: reason.map(str::to_owned),
                duration: elapsed,
                input,
            });
        }
    };
    let verdict = match result {
        Ok(verdict) => verdict,
        Err(error) => {
            metrics.errors.fetch_add(1, Relaxed);
            tracing::warn!(policy = %policy.name, %error, "policy evaluation failed");
            log("error", Some(&error));
            if policy.failure_mode == FailureMode::Allow {
                return Decided::Allow;
            }
            return Decided::Deny(None);
        }
    };
    if verdict.allowed {
        metrics.allowed.fetch_add(1, Relaxed);
        log("allow", verdict.reason.as_deref());
        return Decided::Allow;
    }
    if policy.mode == Mode::Audit {
        metrics.audit_denied.fetch_add(1, Relaxed);
        tracing::info!(
            policy = %policy.name,
            subject = %subject(),
            reason = verdict.reason.as_deref().unwrap_or(""),
            "audit: the policy would deny this"
        );
        log("audit_deny", verdict.reason.as_deref());
        return Decided::Allow;
    }
    metrics.denied.fetch_add(1, Relaxed);
    tracing::debug!(policy = %policy.name, subject = %subject(), reason = verdict.reason.as_deref().unwrap_or(""), "denied by policy");
    log("deny", verdict.reason.as_deref());
    Decided::Deny(Some(verdict))
}

/// The response to a denied request: the decision's status (403 by
/// default), headers and body; gRPC callers get PERMISSION_DENIED (or the
/// status the decision's HTTP status maps to).
fn denied(verdict: Option<&Verdict>, is_grpc: bool) -> Response<ResponseBody> {
    let status = verdict
        .and_then(|v| v.status)
        .unwrap_or(StatusCode::FORBIDDEN);
    let mut response = if is_grpc {
        let grpc = if status == StatusCode::FORBIDDEN {
            7
        } else {
            crate::config::grpc_status_for_http(status)
        };
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(u16::from(grpc)));
        headers.insert("grpc-message", HeaderValue::from_static("policy_denied"));
        response
    } else {
        let body = verdict
            .and_then(|v| v.body.clone())
            .unwrap_or_else(|| "denied by policy\n".to_owned());
        let mut response = Response::new(ResponseBody::full(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        response
    };
    for (name, value) in verdict.map(|v| v.headers.as_slice()).unwrap_or_default() {
        response.headers_mut().append(name.clone(), value.clone());
    }
    response.headers_mut().insert(
        ERROR_HEADER.clone(),
        HeaderValue::from_static("policy_denied"),
    );
    response.extensions_mut().insert(Decision {
        flag: "policy_denied",
        status,
    });
    response
}

/// A route's or listener's policy and its counters.
#[derive(Debug)]
pub(crate) struct Enforcing {
    pub(crate) policy: Arc<CompiledPolicy>,
    pub(crate) metrics: Arc<PolicyMetrics>,
    /// Where decisions are logged, if anywhere.
    pub(crate) log: Option<DecisionLog>,
}

/// Builds [`Policy`] services.
#[derive(Debug, Clone)]
pub(crate) struct PolicyLayer {
    state: Option<Arc<Enforcing>>,
}

impl PolicyLayer {
    /// `None`: no policy, a pass-through.
    pub(crate) fn new(state: Option<Arc<Enforcing>>) -> Self {
        Self { state }
    }
}

impl<S> tower::Layer<S> for PolicyLayer {
    type Service = Policy<S>;

    fn layer(&self, inner: S) -> Policy<S> {
        Policy {
            inner,
            state: self.state.clone(),
        }
    }
}

/// Checks the route's policy, then passes the request on or answers the
/// denial.
#[derive(Debug, Clone)]
pub(crate) struct Policy<S> {
    inner: S,
    state: Option<Arc<Enforcing>>,
}

/// Attached to a request by the connection when its route has a policy.
#[derive(Debug, Clone)]
pub(crate) struct RequestPeers {
    pub(crate) peers: Arc<Peers>,
    pub(crate) is_tls: bool,
}

impl<S, B> tower::Service<Request<B>> for Policy<S>
where
    S: tower::Service<Request<B>, Response = Response<ResponseBody>, Error = ProxyError>,
{
    type Response = Response<ResponseBody>;
    type Error = ProxyError;
    type Future = PolicyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(state) = &self.state {
            let fallback;
            let (peers, is_tls) = match req.extensions().get::<RequestPeers>() {
                Some(p) => (&*p.peers, p.is_tls),
                None => {
                    // Not attached (a caller outside the connection's
                    // path): an unknown source, never a principal.
                    fallback = Peers::new(SocketAddr::from(([0, 0, 0, 0], 0)), None, None, None);
                    (&fallback, false)
                }
            };
            if let Outcome::Deny(response) = check(state, &req, peers, is_tls) {
                return PolicyFuture::Denied {
                    response: Some(response),
                };
            }
        }
        PolicyFuture::Inner {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The future of [`Policy`].
    #[project = PolicyProj]
    pub(crate) enum PolicyFuture<F> {
        Inner { #[pin] inner: F },
        // Boxed: see `RateLimitFuture`.
        Denied { response: Option<Box<Response<ResponseBody>>> },
    }
}

impl<F> Future for PolicyFuture<F>
where
    F: Future<Output = Result<Response<ResponseBody>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            PolicyProj::Inner { inner } => inner.poll(cx),
            PolicyProj::Denied { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(*response)),
                None => Poll::Ready(Err(ProxyError::NoRoute)),
            },
        }
    }
}

#[cfg(test)]
mod tests;
