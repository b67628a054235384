//! Route selection: virtual host by host name, then the first route whose
//! match holds. A pure function over a table prepared when the snapshot is
//! built; tested with tables, no sockets.
//!
//! Host precedence follows Envoy: an exact domain beats the longest
//! `*.suffix`, which beats `*`. The port is ignored and names compare
//! case-insensitively.

use std::collections::HashMap;

use http::{HeaderMap, Method};

use crate::config::{DomainMatch, PathMatch, RouteConfig, RouteMatch, VirtualHost};

/// Host names longer than this match only `*`.
const MAX_HOST_LEN: usize = 255;

/// A prepared routing table; `T` is what a route resolves to.
#[derive(Debug)]
pub struct RouteTable<T> {
    exact: HashMap<Box<str>, usize>,
    /// `(".example.com", vhost)`, longest suffix first.
    suffixes: Vec<(Box<str>, usize)>,
    any: Option<usize>,
    vhosts: Vec<Vec<(RouteMatch, T)>>,
}

/// The request attributes routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// Host (`host` header or `:authority`), port allowed.
    pub host: &'a str,
    /// Method.
    pub method: &'a Method,
    /// Path, without the query.
    pub path: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The SPIFFE ID the caller proved with its client certificate.
    pub source: Option<&'a str>,
}

impl<T> RouteTable<T> {
    /// Prepares the table; `payload` builds what each route resolves to.
    pub fn new(
        config: &RouteConfig,
        mut payload: impl FnMut(&VirtualHost, &crate::config::Route) -> T,
    ) -> Self {
        let mut table = Self {
            exact: HashMap::new(),
            suffixes: Vec::new(),
            any: None,
            vhosts: Vec::new(),
        };
        for (index, vhost) in config.virtual_hosts.iter().enumerate() {
            for domain in &vhost.domains {
                match domain {
                    DomainMatch::Exact(host) => {
                        table.exact.entry(host.clone()).or_insert(index);
                    }
                    DomainMatch::Suffix(suffix) => table.suffixes.push((suffix.clone(), index)),
                    DomainMatch::Any => {
                        table.any.get_or_insert(index);
                    }
                }
            }
            table.vhosts.push(
                vhost
                    .routes
                    .iter()
                    .map(|r| (r.matcher.clone(), payload(vhost, r)))
                    .collect(),
            );
        }
        table
            .suffixes
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        table
    }

    /// Selects the route for a request.
    pub fn select(&self, parts: &RequestParts<'_>) -> Option<&T> {
        let vhost = self.virtual_host(parts.host)?;
        self.vhosts[vhost]
            .iter()
            .find(|(m, _)| matches(m, parts))
            .map(|(_, t)| t)
    }

    fn virtual_host(&self, host: &str) -> Option<usize> {
        let host = crate::wire::host_of(host);
        let mut buf = [0u8; MAX_HOST_LEN];
        let lower = match host.as_bytes() {
            bytes if bytes.len() > MAX_HOST_LEN => return self.any,
            bytes if bytes.iter().any(u8::is_ascii_uppercase) => {
                let out = &mut buf[..bytes.len()];
                out.copy_from_slice(bytes);
                out.make_ascii_lowercase();
                std::str::from_utf8(out).ok()?
            }
            _ => host,
        };
        if let Some(&index) = self.exact.get(lower) {
            return Some(index);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| lower.len() > suffix.len() && lower.ends_with(&**suffix))
            .map(|&(_, index)| index)
            .or(self.any)
    }
}

fn matches(m: &RouteMatch, parts: &RequestParts<'_>) -> bool {
    let path_ok = match &m.path {
        PathMatch::Prefix(prefix) => parts.path.starts_with(&**prefix),
        PathMatch::Exact(exact) => parts.path == &**exact,
        PathMatch::Regex(re) => re.is_match(parts.path),
    };
    path_ok
        && (m.methods.is_empty() || m.methods.contains(parts.method))
        && (m.source_identities.is_empty()
            || parts
                .source
                .is_some_and(|id| m.source_identities.iter().any(|want| want.matches(id))))
        && m.headers.iter().all(|h| h.matches(parts.headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const ROUTES: &str = r#"
listeners: []
clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:1" }] }]
route_configs:
  - name: rc
    virtual_hosts:
      - name: exact
        domains: ["api.example.com"]
        routes:
          - { name: users-get, match: { prefix: /users, methods: [GET] }, cluster: c }
          - { name: users-canary, match: { prefix: /users, headers: [{ name: x-canary, exact: "1" }] }, cluster: c }
          - { name: users-no-auth, match: { prefix: /users, headers: [{ name: authorization, present: false }] }, cluster: c }
          - { name: item, match: { regex: "/items/[0-9]+" }, cluster: c }
          - { name: health, match: { exact: /health }, cluster: c }
          - { name: ua, match: { prefix: /, headers: [{ name: user-agent, regex: "curl/.*" }] }, cluster: c }
      - name: suffix
        domains: ["*.example.com"]
        routes: [{ name: suffix-all, cluster: c }]
      - name: deep-suffix
        domains: ["*.eu.example.com"]
        routes: [{ name: eu-all, cluster: c }]
      - name: fallback
        domains: ["*"]
        routes: [{ name: fallback-all, match: { prefix: /only }, cluster: c }]
"#;

    fn table() -> RouteTable<String> {
        let config = Config::from_yaml(ROUTES, "test").unwrap();
        RouteTable::new(&config.route_configs[0], |_, r| r.name.to_string())
    }

    #[test]
    fn a_route_can_take_only_some_callers_by_spiffe_id() {
        let config = Config::from_yaml(
            r#"
clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:1" }] }]
route_configs:
  - name: r
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - { name: admin, match: { prefix: /, source_identities: ["spiffe://example.org/ns/ops/sa/admin"] }, cluster: c }
          - { name: shop, match: { prefix: /, source_identities: ["spiffe://example.org/ns/shop/*"] }, cluster: c }
          - { name: rest, cluster: c }
"#,
            "test",
        )
        .unwrap();
        let table = RouteTable::new(&config.route_configs[0], |_, r| r.name.to_string());
        let headers = HeaderMap::new();
        let select = |source: Option<&str>| {
            let parts = RequestParts {
                host: "a",
                method: &Method::GET,
                path: "/",
                headers: &headers,
                source,
            };
            table.select(&parts).cloned()
        };
        let route = |id: &str| select(Some(id));
        assert_eq!(
            route("spiffe://example.org/ns/ops/sa/admin").as_deref(),
            Some("admin")
        );
        assert_eq!(
            route("spiffe://example.org/ns/shop/sa/web").as_deref(),
            Some("shop")
        );
        assert_eq!(
            route("spiffe://example.org/ns/shopping/sa/x").as_deref(),
            Some("rest")
        );
        assert_eq!(
            route("spiffe://other.org/ns/shop/sa/web").as_deref(),
            Some("rest")
        );
        assert_eq!(
            select(None).as_deref(),
            Some("rest"),
            "no identity, no match"
        );

        for (bad, why) in [
            ("spiffe://example.org/ns/*/sa/x", "wildcard"),
            ("spiffe://example.org/ns*", "wildcard"),
            ("web", "not a SPIFFE ID"),
        ] {
            let yaml = format!(
                "clusters: [{{ name: c, endpoints: [{{ address: \"127.0.0.1:1\" }}] }}]\n\
                 route_configs: [{{ name: r, virtual_hosts: [{{ name: a, domains: [\"*\"], routes: [\
                 {{ name: x, match: {{ source_identities: [\"{bad}\"] }}, cluster: c }}] }}] }}]\n"
            );
            let error = Config::from_yaml(&yaml, "t").unwrap_err().to_string();
            assert!(
                error.contains("match.source_identities[0]"),
                "{bad}: {error}"
            );
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn selects_by_host_path_method_and_headers() {
        let table = table();
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.append(*k, http::HeaderValue::from_static(v));
            }
            map
        };
        let auth = h(&[("authorization", "x")]);
        let cases: Vec<(&str, Method, &str, HeaderMap, Option<&str>)> = vec![
            (
                "api.example.com",
                Method::GET,
                "/users/1",
                HeaderMap::new(),
                Some("users-get"),
            ),
            (
                "API.Example.COM:8080",
                Method::GET,
                "/users",
                HeaderMap::new(),
                Some("users-get"),
            ),
            (
                "api.example.com",
                Method::POST,
                "/users",
                h(&[("x-canary", "1")]),
                Some("users-canary"),
            ),
            (
                "api.example.com",
                Method::POST,
                "/users",
                HeaderMap::new(),
                Some("users-no-auth"),
            ),
            ("api.example.com", Method::POST, "/users", auth, None),
            (
                "api.example.com",
                Method::GET,
                "/items/42",
                HeaderMap::new(),
                Some("item"),
            ),
            (
                "api.example.com",
                Method::GET,
                "/items/42/x",
                HeaderMap::new(),
                None,
            ),
            (
                "api.example.com",
                Method::GET,
                "/x/items/42",
                HeaderMap::new(),
                None,
            ),
            (
                "api.example.com",
                Method::GET,
                "/health",
                HeaderMap::new(),
                Some("health"),
            ),
            (
                "api.example.com",
                Method::GET,
                "/healthz",
                HeaderMap::new(),
                None,
            ),
            (
                "api.example.com",
                Method::GET,
                "/any",
                h(&[("user-agent", "curl/8.0")]),
                Some("ua"),
            ),
            (
                "api.example.com",
                Method::GET,
                "/any",
                h(&[("user-agent", "wget curl/8.0")]),
                None,
            ),
            (
                "www.example.com",
                Method::GET,
                "/",
                HeaderMap::new(),
                Some("suffix-all"),
            ),
            (
                "a.eu.example.com",
                Method::GET,
                "/",
                HeaderMap::new(),
                Some("eu-all"),
            ),
            (
                "example.com",
                Method::GET,
                "/only/x",
                HeaderMap::new(),
                Some("fallback-all"),
            ),
            ("other.org", Method::GET, "/nope", HeaderMap::new(), None),
            (
                "[::1]:80",
                Method::GET,
                "/only",
                HeaderMap::new(),
                Some("fallback-all"),
            ),
        ];
        for (host, method, path, headers, want) in cases {
            let parts = RequestParts {
                host,
                method: &method,
                path,
                headers: &headers,
                source: None,
            };
            assert_eq!(
                table.select(&parts).map(String::as_str),
                want,
                "{host} {method} {path} {headers:?}"
            );
        }
    }

    #[test]
    fn ports_are_stripped() {
        use crate::wire::host_of;
        assert_eq!(host_of("a.com:80"), "a.com");
        assert_eq!(host_of("a.com"), "a.com");
        assert_eq!(host_of("[::1]:80"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
        assert_eq!(host_of("10.0.0.1:8080"), "10.0.0.1");
        // A port that is not digits stays part of the name; an empty one
        // goes with its colon.
        assert_eq!(host_of("a.com:http"), "a.com:http");
        assert_eq!(host_of("a.com:"), "a.com");
        assert_eq!(host_of(":80"), "");
        assert_eq!(host_of("8080"), "8080");
        assert_eq!(host_of(""), "");
    }
}
