"""Gateway mode: every verified delivery forwarded, after it is durable, to the app's own handler.

`routes` (pure): the route set, derived from `LEDGER.ROUTE_CHANGED` events, and what a route may
point at. `outbox`: pending bodies on local disk, encrypted at rest. `forwarder`: per route and
portal lanes that deliver in ledger order with retries, and record every attempt.
"""
