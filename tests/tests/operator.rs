//! What an operator sees: readiness that says why, clear start-up errors,
//! plain logs when not on a terminal, one line per applied push.

// Helpers outside #[test] functions unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use weft_tests::*;

#[tokio::test]
async fn a_proxy_without_listeners_is_not_ready_and_says_why() {
    let proxy = ProxyProcess::start_unready("admin: { address: \"127.0.0.1:0\" }\nlisteners: []\n")
        .await
        .unwrap();
    let (status, body) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(body, "the configuration has no listeners\n");
}

fn run_proxy(args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(proxy_binary())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_invalid_log_filter_is_refused_at_start() {
    let (code, stderr) = run_proxy(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
        "--log-level",
        "weft_proxy=loud",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--log-level: invalid log filter \"weft_proxy=loud\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn unreadable_files_are_reported_with_the_os_reason() {
    let (code, stderr) = run_proxy(&["--check-config", "/nonexistent/weft.yaml"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("cannot read /nonexistent/weft.yaml: No such file or directory"),
        "{stderr}"
    );
}

#[tokio::test]
async fn logs_carry_no_colour_codes_when_not_on_a_terminal() {
    let echo = echo("plain-logs").await;
    let proxy = ProxyProcess::start(&one_route_config(echo.local_addr(), "http1", ""))
        .await
        .unwrap();
    let log = proxy.log();
    assert!(log.contains("configuration applied"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
}

#[tokio::test]
async fn an_admin_token_guards_everything_but_the_probes() {
    let echo = echo("admin-token").await;
    let scratch = TempDir::new().unwrap();
    let token_file = scratch.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-admin\n").unwrap();
    let config = one_route_config(echo.local_addr(), "http1", "").replace(
        "admin: { address: \"127.0.0.1:0\" }",
        &format!(
            "admin: {{ address: \"127.0.0.1:0\", token_file: \"{}\" }}",
            token_file.display()
        ),
    );
    let proxy = ProxyProcess::start(&config).await.unwrap();
    let admin = proxy.admin;
    let get_with = |path: &'static str, auth: Option<&'static str>| async move {
        let mut req = get(admin, path);
        if let Some(auth) = auth {
            req.headers_mut()
                .insert("authorization", auth.parse().unwrap());
        }
        let response = http1_request(admin, req).await.unwrap();
        let status = response.status().as_u16();
        (status, header(&response, "www-authenticate").to_owned())
    };
    assert_eq!(get_with("/ready", None).await.0, 200);
    assert_eq!(get_with("/live", None).await.0, 200);
    for path in ["/metrics", "/config_dump", "/clusters", "/listeners"] {
        assert_eq!(
            get_with(path, None).await,
            (401, "Bearer".to_owned()),
            "{path}"
        );
        assert_eq!(get_with(path, Some("Bearer wrong")).await.0, 401, "{path}");
        assert_eq!(
            get_with(path, Some("Bearer s3cret-admin")).await.0,
            200,
            "{path}"
        );
    }
    assert!(
        !proxy.log().contains("s3cret-admin"),
        "the token is never logged"
    );
}

#[tokio::test]
async fn an_admin_api_beyond_loopback_is_warned_about() {
    // Bound on the wildcard but never sent any traffic: the warning is
    // what is checked.
    let proxy = ProxyProcess::start_unready("admin: { address: \"0.0.0.0:0\" }\nlisteners: []\n")
        .await
        .unwrap();
    let warned = eventually(DEADLINE, || async {
        proxy.log().contains("admin API reachable beyond loopback")
    })
    .await;
    assert!(warned, "{}", proxy.log());
}
