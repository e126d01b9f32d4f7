"""Accounts and authentication: passwords, tokens, login throttling, audit."""
