# Who may call backend, and how. Written for OPA-Envoy's input document and
# decision path (package envoy.authz, rule allow), so it runs unchanged
# under OPA beside Envoy.
package envoy.authz

import input.attributes.request.http
import input.attributes.source

default allow := {"allowed": false, "body": "not allowed\n"}

allow := {"allowed": true} if {
	caller_allowed
	http.method != "DELETE"
}

allow := {
	"allowed": false,
	"body": "backend does not accept DELETE\n",
	"headers": {"x-denied-by": "backend-authz"},
} if {
	caller_allowed
	http.method == "DELETE"
}

allow := {
	"allowed": false,
	"body": sprintf("%s may not call backend\n", [source.principal]),
	"headers": {"x-denied-by": "backend-authz"},
} if {
	not caller_allowed
}

caller_allowed if source.principal in data.backend.callers
