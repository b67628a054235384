# OPA's Envoy tutorial policy ("Tutorial: Standalone Envoy",
# https://www.openpolicyagent.org/docs/envoy/tutorial-standalone-envoy),
# unchanged from `package` down: weft-proxy runs it as OPA-Envoy does.
#
# A bearer token must verify (HS256 with the secret "secret": a demo, use
# `cert` with your issuer's keys) and be within its nbf/exp; then guests may
# GET /people, and admins may GET it and POST a person whose first name is
# not their own. weft-proxy does not put the request body in the input yet
# (`input.parsed_body`), so every POST is denied.
package envoy.authz

import input.attributes.request.http as http_request

default allow := false

allow if {
    is_token_valid
    action_allowed
}

is_token_valid if {
    token.valid
    now := time.now_ns() / 1000000000
    token.payload.nbf <= now
    now < token.payload.exp
}

action_allowed if {
    http_request.method == "GET"
    token.payload.role == "guest"
    glob.match("/people", ["/"], http_request.path)
}

action_allowed if {
    http_request.method == "GET"
    token.payload.role == "admin"
    glob.match("/people", ["/"], http_request.path)
}

action_allowed if {
    http_request.method == "POST"
    token.payload.role == "admin"
    glob.match("/people", ["/"], http_request.path)
    lower(input.parsed_body.firstname) != base64url.decode(token.payload.sub)
}

token := {"valid": valid, "payload": payload} if {
    [_, encoded] := split(http_request.headers.authorization, " ")
    [valid, _, payload] := io.jwt.decode_verify(encoded, {"secret": "secret"})
}
