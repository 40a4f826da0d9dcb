"""Schemathesis hooks for the services' APIs (SCHEMATHESIS_HOOKS).

A check of our own besides schemathesis' built-in ones: every refusal
(4xx) and error (5xx) carries a JSON body whose `error` says what is wrong.
"""

import schemathesis


@schemathesis.check
def refusal_has_a_message(ctx, response, case):
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(
            f"{response.status_code} without a JSON body: {response.text[:200]!r}"
        )
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, str) or not error.strip():
        raise AssertionError(
            f"{response.status_code} without a message in `error`: {body!r}"[:300]
        )
    return None
