"""Accounts: API keys (store, auth, the ``inferq keys`` and ``inferq db`` commands), rate
limits, revocation of a key's work, and the usage ledger with its ``/v1/usage`` blueprint."""
