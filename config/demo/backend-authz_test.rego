# Unit tests of backend-authz.rego; `weft-cp validate config/demo` runs
# them, as `opa test` would.
package envoy.authz_test

import data.envoy.authz

gateway := "spiffe://demo.weft.local/ns/default/sa/ingress"

frontend := "spiffe://demo.weft.local/ns/default/sa/frontend"

request(principal, method) := {"attributes": {
	"source": {"principal": principal},
	"request": {"http": {"method": method, "path": "/items"}},
}}

test_gateway_may_get if {
	authz.allow.allowed with input as request(gateway, "GET")
}

test_frontend_may_post if {
	authz.allow.allowed with input as request(frontend, "POST")
}

test_nobody_may_delete if {
	not authz.allow.allowed with input as request(frontend, "DELETE")
	authz.allow.headers["x-denied-by"] == "backend-authz" with input as request(frontend, "DELETE")
}

test_other_callers_are_refused if {
	d := authz.allow with input as request("spiffe://demo.weft.local/ns/default/sa/cli", "GET")
	not d.allowed
	d.body == "spiffe://demo.weft.local/ns/default/sa/cli may not call backend\n"
}

test_callers_without_identity_are_refused if {
	not authz.allow.allowed with input as {"attributes": {"request": {"http": {"method": "GET"}}}}
}
