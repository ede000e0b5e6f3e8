"""Today's decoding path (wire, redaction, identity, envelope, drafts as of the one-pass
decoder's branch point), frozen: the differential test holds the fast path to it byte for byte.

Never edit these copies to follow a change in `ledger`: a deliberate behaviour change updates
them in the same commit, with the reason. Since the copy: `delivery_draft` and `trust_event`
store the fold record, as `ledger.drafts` does since migration 0011 (merged from main).
"""
